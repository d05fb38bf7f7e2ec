"""Noticing, in a job of several processes, that another process is gone, and saying so in one line.

When a process dies mid-run (a crash, the OOM killer, SIGKILL), the others wait in their next
collective, or see it fail (gloo: "Connection reset by peer"). JAX notices only when the dead
process's heartbeats time out (100 s), and then aborts every other process with a stack dump
from a C++ thread; that abort cannot be replaced from Python (jaxlib cannot pass its error
callback the status). So the job's processes also hold plain TCP connections, each to process 0:

  - process 0 listens on a free port and publishes it, with a random token, through the
    coordinator's key-value store; each other process connects to it at the coordinator's host
    and says the token and its process index (a connection that does not is ignored);
  - a process that ends cleanly says "bye" first (``leave(clean=True)``, from the entry point, or
    at exit); one that fails says nothing, and ends at once (cli.guard), so that JAX's exit
    handler does not hold it at a shutdown barrier for the others (5 minutes, then an abort);
  - a connection that closes without a "bye" means that its process died or failed: the kernel
    closes a dead process's sockets at once. Process 0 tells the other processes which one it
    lost; each writes one `error:` line naming it and exits with code 3 (``EXIT``), which tells a
    scheduler to restart the whole job; process 0 does the same once they are gone (had it gone
    first, JAX would abort them for the lost coordinator before they could say anything).

When process 0 itself dies, JAX notices at once too (its coordination service was there), and
its abort races with the others' line. A process that hangs, or a host that drops off the network
without closing its connections, is still JAX's to notice, after its heartbeat timeout. If
the connections cannot be made (a firewall between hosts), the run goes on without them, with a
warning in the log; PIXELDIT_WATCH_PEERS=0 turns them off.

``lost_peer(e)`` recognises the same event when it reaches Python first, as a failed collective.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import selectors
import socket
import sys
import threading
import time
from typing import Optional

EXIT = 3  # another process of the job stopped: restart the whole job
ENV = "PIXELDIT_WATCH_PEERS"  # 0: no connections (JAX's heartbeats alone)
_KEY = "pixeldit/peers_port"
_PUBLISH_TIMEOUT_S, _CONNECT_TIMEOUT_S = 60, 10

# What the runtime says when a peer of a collective or of the coordinator is gone. Kept narrow: a
# match turns a traceback into one line that blames another process.
_PEER_LOST = re.compile(
    r"Gloo \w+ failed|Connection (?:reset|closed) by peer|heartbeat timeout|stopped sending heartbeats"
    r"|tasks are unhealthy|ncclRemoteError|remote process exited", re.IGNORECASE)

_lock = threading.Lock()  # one reporter: the watcher thread, or the entry point leaving
_state = dict(process=0, count=1, leaving=False, socks={})  # socks: socket -> the peer's index


def lost_peer(e: BaseException) -> Optional[str]:
  """The runtime's reason, in one line, when `e` (or what it wraps) says that another process of
  the job is gone; None otherwise, and always outside a job of several processes."""
  if not in_job():
    return None
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    for line in str(e).splitlines():
      if _PEER_LOST.search(line):
        line = re.sub(r"\[[\w./\-]+:\d+\]\s*", "", line)  # gloo's [source/file.cc:NNN]
        line = re.sub(r"^(?:UNKNOWN|INTERNAL|UNAVAILABLE|ABORTED): ", "", line.strip())
        return line if len(line) <= 200 else line[:197] + "..."
    e = e.__cause__ or e.__context__
  return None


def line(what: str) -> str:
  """The one `error:` line of a process that outlived a peer (without the "error: ")."""
  return (f"process {_state['process']} of {_state['count']}: {what}; see its log, then restart "
          "every process of the job")


def exit_lost(text: str, lost: Optional[int] = None):
  """Write `error: text` and end the process now with EXIT, unless it is already leaving: JAX's
  exit handler would wait at a shutdown barrier for the dead process, then abort. Process 0 first
  tells the others which process is gone (`lost`, if known), and gives them a moment to end."""
  with _lock:
    if _state["leaving"]:
      return
    _state["leaving"] = True
    if _state["process"] == 0:
      _tell_and_wait(lost)
    os.write(2, _line_start() + f"error: {text}\n".encode())
    os._exit(EXIT)  # noqa: SLF001 - the main thread may be blocked in a collective


def _tell_and_wait(lost: Optional[int], seconds: float = 3.0):
  socks = [s for s, peer in list(_state["socks"].items()) if peer not in (None, lost)]
  for sock in socks:
    try:
      sock.sendall(f"lost {'?' if lost is None else lost}\n".encode())
    except OSError:
      pass
  deadline = time.monotonic() + seconds  # each closes its connection as it exits
  for sock in socks:
    try:
      sock.settimeout(max(0.0, deadline - time.monotonic()))
      while sock.recv(4096):
        pass
    except OSError:
      pass


def _line_start() -> bytes:
  """A newline first while a progress bar holds the end of the line (it ends without one)."""
  tqdm = sys.modules.get("tqdm")
  try:
    return b"\n" if tqdm is not None and len(tqdm.tqdm._instances) else b""  # noqa: SLF001
  except Exception:  # noqa: BLE001 - a tqdm without the attribute: no newline
    return b""


def in_job() -> bool:
  """Whether this process is one of several (watched or not)."""
  return _state["count"] > 1


def leave(clean: bool):
  """This process is ending on its own: stop watching, and tell the others, who end too unless it
  ends cleanly. Process 0 failing tells them itself, and gives them a moment to end, before it
  goes: once it is gone, JAX would abort them for the lost coordinator."""
  with _lock:
    if _state["leaving"]:
      return
    _state["leaving"] = True
    if not clean and _state["process"] == 0:
      _tell_and_wait(0)
      return
    for sock in list(_state["socks"]) if clean else ():
      try:
        sock.sendall(b"bye\n")
      except OSError:
        pass


def watch(client, process: int, count: int, coordinator: Optional[str]):
  """Connect the job's processes (module docstring) and watch the connections from a daemon
  thread. `client` is JAX's distributed client (its key-value store), `coordinator` its address
  (host:port)."""
  _state.update(process=process, count=count, leaving=False, socks={})
  if os.environ.get(ENV, "1") == "0":
    return
  # A program that does not end through cli.guard (a script) is taken to end cleanly. Its "bye"
  # goes before JAX's own exit handler (registered earlier) holds every process at a shutdown
  # barrier; without it, a peer's connection closing while this process exits would look lost.
  atexit.register(leave, True)
  try:
    if process == 0:
      server, token = _listen(), secrets.token_hex(16)
      client.key_value_set(_KEY, f"{server.getsockname()[1]} {token}")
      threading.Thread(target=_watch, args=(server, token), name="pixeldit-peers", daemon=True).start()
    else:
      host = coordinator.rsplit(":", 1)[0].strip("[]")  # [v6]:port too
      port, token = client.blocking_key_value_get(_KEY, _PUBLISH_TIMEOUT_S * 1000).split()
      sock = socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S)
      sock.settimeout(None)
      sock.sendall(f"{token} {process}\n".encode())
      _state["socks"][sock] = 0
      threading.Thread(target=_watch, args=(None, token), name="pixeldit-peers", daemon=True).start()
  except Exception as e:  # noqa: BLE001 - without the connections the run goes on as JAX's alone
    logging.warning("Not watching the job's other processes (%s: %s): if one dies, JAX notices "
                    "after its heartbeat timeout and aborts this one.", type(e).__name__, e)


def _who(index: Optional[int]) -> str:
  return {0: "process 0 (the coordinator)", None: "another process"}.get(index, f"process {index}")


def _listen() -> socket.socket:
  if socket.has_dualstack_ipv6():
    return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
  return socket.create_server(("", 0))


def _watch(server: Optional[socket.socket], token: str):
  sel = selectors.DefaultSelector()
  if server is not None:
    sel.register(server, selectors.EVENT_READ, "accept")
  for sock, peer in _state["socks"].items():
    sel.register(sock, selectors.EVENT_READ, [peer, b"", False])  # index, bytes so far, said bye
  while True:
    for key, _ in sel.select():
      if key.data == "accept":
        sock, _ = server.accept()
        sel.register(sock, selectors.EVENT_READ, [None, b"", False])  # known once it says the token
        continue
      sock, info = key.fileobj, key.data
      try:
        data = sock.recv(4096)
      except OSError:
        data = b""
      if data:
        info[1] = (info[1] + data)[-256:]
        lines = info[1].split(b"\n")
        if info[0] is None and len(lines) > 1:  # a new connection's first line: token, index
          said = lines[0].decode(errors="replace").split()
          if len(said) != 2 or said[0] != token or not said[1].isdigit():
            sel.unregister(sock)  # not one of the job's processes
            sock.close()
            continue
          info[0] = _state["socks"][sock] = int(said[1])
        info[2] = info[2] or b"bye" in lines[:-1]
        told = [l for l in lines[:-1] if l.startswith(b"lost ")]  # from process 0
        if told and info[0] == 0:
          who = told[0].split()[1].decode()
          exit_lost(line(f"{_who(int(who) if who.isdigit() else None)} stopped without finishing"))
        continue
      sel.unregister(sock)
      _state["socks"].pop(sock, None)
      if info[0] is not None and not info[2]:
        exit_lost(line(f"{_who(info[0])} stopped without finishing"), lost=info[0])
