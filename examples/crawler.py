"""Crawl a web site with asyncio and aiohttp, retrying 5xx answers; report broken links.

    python examples/crawler.py [--pages N] [--workers N] [--latency SECONDS]
    python examples/crawler.py --url http://127.0.0.1:8000/   # a site of your own
    python examples/crawler.py --compare                      # against asyncio.gather

Without ``--url`` the example starts a local test site in a thread
(`http.server`, on a free port of 127.0.0.1): ``--pages`` pages that link to
one another, each answered after ``--latency`` seconds, some of them
answering 503 twice before they work, one always answering 500, and a few
links to pages that do not exist (404).

The crawl goes level by level from the root: each level is one pipeline run
whose source is the level's new URLs. ``fetch`` is an async stage (``workers``
requests in flight) with ``retries=3``: a 5xx answer raises, and the stage
tries again after a short backoff; a page that still fails is recorded
(``on_error="skip"``) and the crawl goes on. Parsing the HTML is a thread
stage. Needs the ``aiohttp`` package (``pip install aiohttp``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import html.parser
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import aiohttp
from _compare import positive_int  # examples/, next to this file

import conveyor as cv

RETRIES = 3
BACKOFF = cv.Backoff(initial=0.05, maximum=0.5)


class ServerError(Exception):
    """The server answered 5xx: worth trying again."""


class Page(NamedTuple):
    """What one URL answered."""

    url: str
    status: int
    body: str


class Parsed(NamedTuple):
    """A fetched page's title and the absolute URLs it links to (same site only)."""

    url: str
    status: int
    title: str
    links: list[str]


@dataclass
class Crawl:
    """What a crawl found."""

    pages: dict[str, Parsed] = field(default_factory=dict)
    """Every URL fetched (with its status), by URL."""
    failed: dict[str, str] = field(default_factory=dict)
    """URLs that still failed after the retries, with the last error."""
    referrers: dict[str, set[str]] = field(default_factory=dict)
    """Which pages link to each URL."""
    retries: int = 0
    """Requests made again after a 5xx answer."""

    def broken(self) -> dict[str, set[str]]:
        """Links to pages that answered 404, with the pages that hold them."""
        return {
            url: self.referrers.get(url, set())
            for url, page in self.pages.items()
            if page.status == 404
        }

    def add(self, parsed: Parsed, seen: set[str], frontier: list[str]) -> None:
        """Record a page, and queue the URLs it links to that nobody has seen."""
        self.pages[parsed.url] = parsed
        for link in parsed.links:
            self.referrers.setdefault(link, set()).add(parsed.url)
            if link not in seen:
                seen.add(link)
                frontier.append(link)


# --------------------------------------------------------------------- the job's parts


async def get(session: aiohttp.ClientSession, url: str) -> Page:
    """One GET; a 5xx answer raises `ServerError`."""
    async with session.get(url) as response:
        if response.status >= 500:
            raise ServerError(f"{url} answered {response.status}")
        body = await response.text() if response.status == 200 else ""
        return Page(url, response.status, body)


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.hrefs: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_title = tag == "title"
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False


def parse(page: Page) -> Parsed:
    """The page's title and its links to the same site, made absolute, fragments dropped."""
    parser = _Links()
    parser.feed(page.body)
    site = urllib.parse.urlsplit(page.url).netloc
    links = []
    for href in parser.hrefs:
        url = urllib.parse.urldefrag(urllib.parse.urljoin(page.url, href)).url
        if urllib.parse.urlsplit(url).netloc == site:
            links.append(url)
    return Parsed(page.url, page.status, parser.title.strip(), links)


# --------------------------------------------------------------------- with conveyor


# --8<-- [start:conveyor]
async def open_session() -> aiohttp.ClientSession:
    """``on_start``: one HTTP session per worker, made on the stage's event loop."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))


async def close_session(session: aiohttp.ClientSession) -> None:
    """``on_stop``: close the worker's session."""
    await session.close()


async def fetch(url: str) -> Page:
    """The async stage: GET ``url`` with this worker's session."""
    return await get(cv.worker_state(), url)


def crawl_with_conveyor(root: str, workers: int) -> Crawl:
    """Crawl from ``root`` level by level, one pipeline run per level."""
    crawl, seen, frontier = Crawl(), {root}, [root]
    while frontier:
        level, frontier = frontier, []
        result = (
            cv.Pipeline(level)
            .map(
                fetch,
                runtime="async",
                workers=workers,
                ordered=False,
                retries=RETRIES,
                backoff=BACKOFF,
                on_error="skip",
                on_start=open_session,
                on_stop=close_session,
            )
            .map(parse)
            .run(collect=True)
        )
        for parsed in result.outputs or []:
            crawl.add(parsed, seen, frontier)
        crawl.failed.update({f.item: str(f.error) for f in result.failures})
        crawl.retries += sum(s.retried for s in result.stats)
    return crawl


# --8<-- [end:conveyor]


# --------------------------------------------------------------------- plain Python


# --8<-- [start:plain]
async def _crawl_plain(root: str, workers: int) -> Crawl:
    crawl, seen, frontier = Crawl(), {root}, [root]
    limit = asyncio.Semaphore(workers)

    async def fetch_with_retries(session: aiohttp.ClientSession, url: str) -> None:
        async with limit:
            for attempt in range(RETRIES + 1):
                try:
                    page = await get(session, url)
                    break
                except (ServerError, aiohttp.ClientError) as error:
                    if attempt == RETRIES:
                        crawl.failed[url] = str(error)
                        return
                    crawl.retries += 1
                    await asyncio.sleep(BACKOFF.delay(attempt + 1))
        crawl.add(parse(page), seen, frontier)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while frontier:
            level = frontier.copy()
            frontier.clear()
            await asyncio.gather(*(fetch_with_retries(session, url) for url in level))
    return crawl


def crawl_plain(root: str, workers: int) -> Crawl:
    """The same crawl with asyncio.gather, a semaphore and a retry loop by hand."""
    return asyncio.run(_crawl_plain(root, workers))


# --8<-- [end:plain]


# --------------------------------------------------------------------- the test site


@dataclass
class Site:
    """A generated site: which pages exist, which fail and how, how slowly they answer."""

    pages: int
    latency: float
    flaky_every: int = 10  # page i with i % flaky_every == 3 answers 503 two times in three
    broken_page: int = 13  # this page always answers 500
    requests: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str) -> tuple[int, str]:
        """The status and the HTML for ``path``."""
        with self.lock:
            count = self.requests[path] = self.requests.get(path, 0) + 1
        time.sleep(self.latency)  # the network and the server's own work
        if path == "/":
            return 200, self.html("Home", [f"/page/{i}" for i in range(0, self.pages, 10)])
        number = path.removeprefix("/page/")
        if not number.isdigit() or int(number) >= self.pages:
            return 404, "<title>Not found</title>"
        i = int(number)
        if i == self.broken_page:
            return 500, "<title>Internal error</title>"
        if i % self.flaky_every == 3 and count % 3 != 0:
            return 503, "<title>Busy</title>"
        links = [f"/page/{(i + 1) % self.pages}", f"/page/{(i * 7 + 3) % self.pages}", "/"]
        if i % 25 == 7:
            links.append(f"/page/{self.pages + i}#top")  # a link to a page that does not exist
        return 200, self.html(f"Page {i}", links)

    @staticmethod
    def html(title: str, links: list[str]) -> str:
        """A page with ``title`` and links to ``links``."""
        anchors = "".join(f'<li><a href="{link}">{link}</a></li>' for link in links)
        return f"<html><head><title>{title}</title></head><body><ul>{anchors}</ul></body></html>"


@contextlib.contextmanager
def serve(site: Site) -> Iterator[str]:
    """Serve ``site`` on a free port of 127.0.0.1 in a thread; yield its root URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection serves many requests
        # The headers and the body go out in two writes: without this, Nagle's
        # algorithm holds the body until the client's delayed ACK (40 ms).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            status, body = site.answer(self.path)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: the crawl prints its own summary

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # socketserver's default backlog is 5: a burst of new connections
        # beyond it waits for the client's SYN retry, a whole second later.
        request_queue_size = 128

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client closing its kept-alive connection is no error of the site

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="test-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def summary(crawl: Crawl) -> str:
    """What the crawl found, in a few lines."""
    ok = sum(1 for page in crawl.pages.values() if page.status == 200)
    lines = [f"{ok} pages fetched, {crawl.retries} retries after 5xx answers"]
    for url, error in sorted(crawl.failed.items()):
        lines.append(f"failed after {RETRIES} retries: {url} ({error})")
    for url, referrers in sorted(crawl.broken().items()):
        lines.append(f"broken link: {url} (404), on {', '.join(sorted(referrers))}")
    return "\n".join(lines)


def main() -> int:
    """Parse the command line, crawl, print what was found."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="crawl this site instead of the local test site")
    parser.add_argument("--pages", type=positive_int, default=200, help="pages of the test site")
    parser.add_argument("--latency", type=float, default=0.02, help="test site's answer delay")
    parser.add_argument("--workers", type=positive_int, default=32, help="requests in flight")
    parser.add_argument("--compare", action="store_true", help="time it against asyncio.gather")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds of --compare")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        root = args.url or stack.enter_context(serve(Site(args.pages, args.latency)))
        crawl = crawl_with_conveyor(root, args.workers)
        print(summary(crawl))
        if not any(page.status == 200 for page in crawl.pages.values()):
            why = crawl.failed.get(root) or f"it answered {crawl.pages[root].status}"
            print(f"crawler: nothing was fetched from {root}: {why}", file=sys.stderr)
            return 1
        if args.compare:
            from _compare import compare, print_comparison

            times = compare(
                {
                    "conveyor": functools.partial(crawl_with_conveyor, root, args.workers),
                    "asyncio.gather": functools.partial(crawl_plain, root, args.workers),
                },
                rounds=args.rounds,
            )
            code = {
                "conveyor": [open_session, close_session, fetch, crawl_with_conveyor],
                "asyncio.gather": [_crawl_plain, crawl_plain],
            }
            print_comparison(times, code, f"crawl of {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
