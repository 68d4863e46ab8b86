"""Same-origin server for the headless OHIF test: OHIF's built ``dist/`` + a proxy to Orthanc's DICOMweb root.

    python serve.py --dist DIR --config app-config.js --upstream http://127.0.0.1:8042/dicom-web [--port 0]

* ``/dicom-web/...``  -> ``<upstream>/...`` (any method, body and headers passed through, response streamed), so the
  viewer's DICOMweb calls are same-origin: no CORS anywhere.
* ``/app-config.js``  -> the ``--config`` file (replaces the dist's own).
* anything else       -> the file under ``--dist``; a path with no such file gets ``index.html`` (SPA fallback:
  ``/viewer?StudyInstanceUIDs=...`` is a client-side route).

Loopback only. Prints ``LISTENING <port>`` on stdout once bound (``--port 0`` picks a free one). Stdlib only.
"""

from __future__ import annotations

import argparse
import http.client
import mimetypes
import os
import posixpath
import shutil
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
TYPES = {".js": "application/javascript", ".mjs": "application/javascript", ".wasm": "application/wasm",
         ".css": "text/css", ".html": "text/html; charset=utf-8", ".json": "application/json",
         ".svg": "image/svg+xml", ".woff2": "font/woff2", ".map": "application/json"}
PREFIX = "/dicom-web"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ohif-test-serve"
    dist: Path
    config: Path
    upstream: urllib.parse.SplitResult
    quiet = True

    def log_message(self, fmt, *args):  # noqa: D102 - keep test output clean unless asked
        if not self.quiet:
            sys.stderr.write("serve: " + fmt % args + "\n")

    # -- routing ------------------------------------------------------------------------------------------------
    def _route(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == PREFIX or path.startswith(PREFIX + "/"):
            return self._proxy()
        if self.command not in ("GET", "HEAD"):
            return self._send_plain(405, "method not allowed")
        if path == "/app-config.js":
            return self._send_file(self.config)
        return self._static(path)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = _route

    # -- static + SPA fallback ------------------------------------------------------------------------------------
    def _static(self, path: str) -> None:
        rel = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
        candidate = (self.dist / rel).resolve() if rel and rel != "." else self.dist / "index.html"
        if self.dist not in candidate.parents and candidate != self.dist / "index.html":
            return self._send_plain(404, "not found")
        if candidate.is_dir():
            candidate = candidate / "index.html"
        if not candidate.is_file():
            if path.startswith("/sw.js") or path.endswith((".js", ".css", ".wasm", ".map", ".png", ".ico", ".json")):
                return self._send_plain(404, "not found")  # a missing asset is an error, not a route
            candidate = self.dist / "index.html"
        self._send_file(candidate)

    def _send_file(self, f: Path) -> None:
        ctype = TYPES.get(f.suffix) or mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        size = f.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-cache" if f.suffix == ".html" or f.name == "app-config.js" else "max-age=3600")
        self.end_headers()
        if self.command != "HEAD":
            with open(f, "rb") as fh:
                shutil.copyfileobj(fh, self.wfile, 1 << 20)

    def _send_plain(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- reverse proxy --------------------------------------------------------------------------------------------
    def _proxy(self) -> None:
        up = self.upstream
        split = urllib.parse.urlsplit(self.path)
        target = up.path.rstrip("/") + split.path[len(PREFIX):] + (f"?{split.query}" if split.query else "")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = up.netloc
        conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=120)
        try:
            conn.request(self.command, target, body=body, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            return self._send_plain(502, f"upstream error: {exc}")
        try:
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            clen = resp.getheader("Content-Length")
            chunked = clen is None and self.command != "HEAD" and resp.status not in (204, 304)
            if clen is not None:
                self.send_header("Content-Length", clen)
            elif chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command == "HEAD":
                return
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                if chunked:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    self.wfile.write(chunk)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", required=True, type=Path)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--upstream", required=True, help="Orthanc's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    dist = args.dist.resolve()
    if not (dist / "index.html").is_file():
        ap.error(f"{dist} has no index.html")
    Handler.dist, Handler.config = dist, args.config.resolve()
    Handler.upstream = urllib.parse.urlsplit(args.upstream)
    Handler.quiet = not args.verbose
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"LISTENING {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    os.umask(0o022)
    main()
