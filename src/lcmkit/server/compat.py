"""What the server does with request settings it cannot honour: refuse them (the default) or warn.

Both dialects carry settings that lcmkit does not implement (A1111's hires fix or face restoration, OpenAI's
`style`, fields this server has never heard of). Generating anyway and returning an image that silently ignores
them would mislead the client, so by default the request is refused with a 400 that names every such setting.
A lenient deployment can choose `Settings.unsupported = "warn"` (`lcmkit serve --unsupported warn`): the request
then runs without them and the reply carries a top-level `warnings` list saying what was ignored; the infotext
and `info` describe only what was done.

Settings that cannot be ignored without producing something else entirely (an inpainting mask, another
checkpoint, a hosted-URL reply) are refused under either policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lcmkit.server.jobs import UNSUPPORTED_POLICIES as POLICIES
from lcmkit.server.jobs import LimitError

__all__ = ["POLICIES", "Review", "UnsupportedSettings"]


class UnsupportedSettings(LimitError):
    """Settings the request asked for that lcmkit does not honour (under the "refuse" policy)."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message, names[0] if names else None)
        self.names = names


@dataclass
class Review:
    """Collects the unhonoured settings of one request, then refuses or turns them into warnings."""

    policy: str
    found: list[tuple[str, str]] = field(default_factory=list)  # (field name, what is not honoured)

    def add(self, name: str, message: str) -> None:
        self.found.append((name, message))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.found]

    def finish(self, hint: str = "") -> list[str]:
        """The warnings to send back; under "refuse" raise `UnsupportedSettings` naming every setting instead."""
        messages = [message for _, message in self.found]
        if self.found and self.policy != "warn":
            advice = hint or (
                "leave them out or at their defaults, or start the server with --unsupported warn "
                "to run without them and get warnings instead"
            )
            raise UnsupportedSettings(
                f"not supported by this server: {'; '.join(messages)} ({advice})", self.names
            )
        return messages
