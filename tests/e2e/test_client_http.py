"""The client's HTTP/1.1 response reader: complete responses parse, anything cut short or
malformed is a _BadResponse (the connection is dropped and the call retried), never a wrong body."""

from __future__ import annotations

import io

import pytest

from secfed.transport.client import _BadResponse, _Connection


def _conn(raw: bytes) -> _Connection:
    conn = object.__new__(_Connection)
    conn.reader = io.BufferedReader(io.BytesIO(raw))  # type: ignore[assignment]
    conn.reusable = True
    return conn


def test_content_length_body_and_keep_alive() -> None:
    conn = _conn(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Secfed-Sha256: ab\r\n\r\nhelloHTTP/1.1")
    r = conn._read_response("POST")
    assert (r.status_code, r.content, r.headers["x-secfed-sha256"]) == (200, b"hello", "ab")
    assert conn.reusable
    assert conn.reader.read() == b"HTTP/1.1"  # nothing past the body was consumed


def test_chunked_body_with_trailer() -> None:
    conn = _conn(b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n")
    r = conn._read_response("GET")
    assert (r.status_code, r.content) == (202, b"abcdefg")


def test_connection_close_and_unframed_body() -> None:
    conn = _conn(b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 2\r\n"
                 b"\r\n{}")
    r = conn._read_response("POST")
    assert r.status_code == 413 and r.json() == {} and not conn.reusable
    conn = _conn(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    assert conn._read_response("GET").content == b"until the end" and not conn.reusable


def test_no_body_statuses() -> None:
    conn = _conn(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert conn._read_response("GET").content == b""


@pytest.mark.parametrize("raw", [
    b"",  # closed before answering
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # body cut short
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n",  # headers cut short
    b"SMTP 220 hello\r\n\r\n",  # not HTTP
    b"HTTP/1.1 abc OK\r\n\r\n",  # status not a number
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n",  # header line too long
])
def test_cut_or_malformed_responses_are_refused(raw: bytes) -> None:
    with pytest.raises(_BadResponse):
        _conn(raw)._read_response("GET")
