"""Static HTML pages of images, as upstream pix2pix writes them (``web/index.html``)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import dominate
from dominate.tags import a, br, h3, img, meta, p, table, td, th, tr

from util.atomic import atomic_path


class ImageCell(NamedTuple):
    """One picture of an :meth:`HTML.add_image_grid` row."""

    image: str  # file name relative to images/; the picture links to itself
    caption: str
    width: int | None = None  # display width in pixels; None: the file's own


class HTML:
    """A page in ``web_dir/index.html`` whose images live in ``web_dir/images/``.

    Args:
        web_dir: the page's folder.
        title: page title.
        refresh: reload the page every N seconds (0: never), for pages of a running job.
    """

    def __init__(self, web_dir: Path, title: str, refresh: int = 0):
        self.web_dir = Path(web_dir)
        self.img_dir = self.web_dir / "images"
        self.img_dir.mkdir(parents=True, exist_ok=True)
        self.doc = dominate.document(title=title)
        if refresh > 0:
            with self.doc.head:
                meta(http_equiv="refresh", content=str(refresh))

    def add_header(self, text: str) -> None:
        with self.doc:
            h3(text)

    def add_text(self, text: str) -> None:
        with self.doc:
            p(text)

    def add_table_rows(self, header: list[str], rows: list[list[str]]) -> None:
        """A plain table (e.g. metrics): one header row, then the rows."""
        with self.doc:
            with table(border=1, style="border-collapse: collapse; margin: 8px 0"):
                with tr():
                    for cell in header:
                        td(cell, style="padding: 2px 8px; font-weight: bold")
                for row in rows:
                    with tr():
                        for cell in row:
                            td(cell, style="padding: 2px 8px")

    def add_images(self, images: list[str], captions: list[str], links: list[str], width: int = 256) -> None:
        """One row of images; ``images`` and ``links`` are file names relative to ``images/``.

        Names are written URL-encoded, so a file named ``a #1?.png`` is found by the browser
        (unencoded, ``#`` and ``?`` would end the path and ``%`` would start an escape).
        """
        with self.doc:
            with table(border=1, style="table-layout: fixed;"):
                with tr():
                    for image, caption, link in zip(images, captions, links, strict=True):
                        with td(style="word-wrap: break-word;", halign="center", valign="top"):
                            with p():
                                with a(href=image_url(link)):
                                    img(style=f"width:{width}px", src=image_url(image))
                                br()
                                p(caption)

    def add_image_grid(self, rows: list[tuple[str, list[ImageCell]]], width: int = 256) -> None:
        """A table of pictures: each row a label cell (e.g. the display window), then its pictures.

        Args:
            rows: ``(label, cells)`` per row; a cell without a width is shown ``width`` px wide.
            width: the default display width in pixels.
        """
        with self.doc:
            with table(border=1, style="table-layout: fixed; border-collapse: collapse; margin: 4px 0"):
                for label, cells in rows:
                    with tr():
                        th(label, style="padding: 2px 8px; max-width: 120px; text-align: left; font-weight: normal")
                        for cell in cells:
                            with td(style="word-wrap: break-word;", halign="center", valign="top"):
                                with a(href=image_url(cell.image)):
                                    img(style=f"width:{cell.width or width}px", src=image_url(cell.image))
                                br()
                                p(cell.caption, style="margin: 2px")

    def save(self) -> Path:
        """Write ``index.html`` (whole or not at all: a training page is rewritten while browsers reload it)."""
        path = self.web_dir / "index.html"
        with atomic_path(path) as partial:
            partial.write_text(self.doc.render())
        return path


def image_url(name: str) -> str:
    """The page-relative URL of ``images/<name>``: ``"a #1?.png"`` -> ``"images/a%20%231%3F.png"``."""
    return "images/" + quote(name)
