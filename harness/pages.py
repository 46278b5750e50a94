"""The docs' fenced code blocks, which tests run as a user pastes them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from harness.servers import REPO

CURL_LINE = re.compile(r"^\s*(\$\s+)?curl\b", re.MULTILINE)
CLIENT_LINE = re.compile(r"^\s*(\$\s+)?sam-fast-client\b", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page: its info string, the line its text starts on, its text."""

    page: Path
    info: str
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def has_curl(self) -> bool:
        """Whether a line of the block starts with `curl`."""
        return CURL_LINE.search(self.text) is not None

    def has_client(self) -> bool:
        """Whether a line of the block starts with `sam-fast-client`."""
        return CLIENT_LINE.search(self.text) is not None


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced (```) code blocks of a Markdown page, in order."""
    blocks: list[Block] = []
    info: str | None = None
    start = 0
    lines: list[str] = []
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        fence = re.match(r"^\s*```(.*)$", line)
        if info is None and fence:
            info, start, lines = fence.group(1).strip(), number + 1, []
        elif info is not None and fence and not fence.group(1).strip():
            blocks.append(Block(page, info, start, "\n".join(lines) + "\n"))
            info = None
        elif info is not None:
            lines.append(line)
    assert info is None, f"{page.relative_to(REPO)}: a fence opened on line {start - 1} is never closed"
    return blocks
