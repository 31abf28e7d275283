"""A workspace: config.yaml, its cadences, its templates, its store and its connectors."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from relance.channels import Connector, load_connector
from relance.config import Config, load_config
from relance.errors import SpecInvalid, UserInputError
from relance.events import Channel
from relance.rendering import Renderer
from relance.spec import Sequence, load_sequence
from relance.store import Store, database_url

_STORE_LOCK = threading.RLock()


@dataclass
class Workspace:
    root: Path
    config: Config
    sequences: dict[str, Sequence]
    problems: list[UserInputError] = field(default_factory=list)  # cadence files that did not load
    _connectors: dict[Channel, Connector] = field(default_factory=dict, repr=False)
    _store: Store | None = field(default=None, repr=False)

    @classmethod
    def load(cls, root: Path | str = ".") -> "Workspace":
        root = Path(root).resolve()
        config = load_config(root / "config.yaml")
        sequences, problems = load_sequences(root / config.sequences_dir)
        return cls(root=root, config=config, sequences=sequences, problems=problems)

    @property
    def templates_dir(self) -> Path:
        return self.root / self.config.templates_dir

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.templates_dir)

    @property
    def store(self) -> Store:
        with _STORE_LOCK:  # the web app's threads and a flow's task threads share one workspace
            if self._store is None:
                self._store = Store(database_url(self.config.database, self.root))
            return self._store

    @property
    def database_url(self) -> str:
        return database_url(self.config.database, self.root)

    def connector(self, channel: Channel) -> Connector:
        if channel not in self._connectors:
            choice = self.config.connectors.get(channel)
            if choice is None:
                raise UserInputError(f"no connector configured for {channel.value}", key=f"connectors.{channel.value}")
            self._connectors[channel] = load_connector(choice.use, channel, choice.settings, workspace=self)
        return self._connectors[channel]

    def sequence(self, name: str) -> Sequence:
        try:
            return self.sequences[name]
        except KeyError:
            raise UserInputError(
                f"unknown sequence {name!r} (known: {', '.join(sorted(self.sequences)) or 'none'})"
            ) from None

    def close(self) -> None:
        for connector in self._connectors.values():
            connector.close()
        self._connectors.clear()
        if self._store is not None:
            self._store.dispose()
            self._store = None


def load_sequences(directory: Path) -> tuple[dict[str, Sequence], list[UserInputError]]:
    """Every *.yaml cadence below `directory`; a bad file is reported and the others still load."""
    sequences: dict[str, Sequence] = {}
    problems: list[UserInputError] = []
    for path in sorted(directory.glob("**/*.y*ml")):
        try:
            seq = load_sequence(path)
        except SpecInvalid as exc:
            problems.extend(exc.problems)
            continue
        if seq.name in sequences:
            problems.append(
                UserInputError(f"sequence name {seq.name!r} is also used by {sequences[seq.name].source}", file=str(path), key="name")
            )
            continue
        sequences[seq.name] = seq
    return sequences, problems
