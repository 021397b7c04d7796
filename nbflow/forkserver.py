"""The fork server: a warm process that forks one fresh IPython kernel per request.

Starting a kernel normally costs a new interpreter plus ~0.4 s of importing
ipykernel and IPython. The fork server pays that once: it imports ipykernel
(and nothing user-level, starts no thread, creates no zmq context), then for
each request forks a child that becomes an ordinary ``IPKernelApp`` on the
connection file the driver wrote. Every kernel is still a separate, fresh
process; only the imported-but-unused library code is shared. What a fork
cannot renew is the interpreter's string-hash seed: hash() of a str, and so the
iteration order of a set of strings, is the same in every kernel of one server.

This module owns
- the server process (:func:`serve`, run in a subprocess by :class:`ForkServer`),
- the child set-up that makes a forked kernel look like one started by
  ``python -m ipykernel_launcher`` in the requested directory and environment
  (also to whoever reads its environment in /proc),
- the driver-side handle (:class:`ForkServer`, :class:`ForkedKernel`) and the
  wire protocol between the two,
- :class:`ForkServerProvisioner` (defined in :mod:`nbflow.provisioner`, which imports
  jupyter_client: this module does not, so that the server can be started before
  anything else of a run is ready), the kernel provisioner through which an
  ``AsyncKernelManager`` launches, signals, polls and kills a forked kernel.
It does not choose between forked and ordinary kernels, nor wait for readiness:
:mod:`nbflow.kernels` does. The server process loads this file by path, without
importing the ``nbflow`` package, so nothing of nbflow ends up inside a kernel;
it uses the stdlib only.

Protocol (one Unix-socket connection per kernel, JSON lines):
  driver -> server  {"argv": [python, "-m", "ipykernel_launcher", ...], "cwd": ..., "env": {...}}
  server -> driver  {"pid": 1234}            or {"error": "..."}
  server -> driver  {"exit": returncode}     when the kernel process has exited
A *warm* fork (``"warm": true`` in the request) initialises its kernel (sockets bound, shell made) and then
waits, before its event loop starts and before its start-up files and extensions run, for the driver's
second line, ``{"cwd": ..., "env": {...}}``, which the server passes on: only then does it take that
directory and environment and start serving. So a pool can keep a kernel nearly ready without knowing
which step (directory, NBFLOW_* variables) it will be for.
The kernel lives as long as its connection: when the driver closes it (or dies),
the server SIGKILLs the kernel's process group. When the driver's pipe to the
server's stdin closes (driver exit, even by SIGKILL) the server kills every
kernel's process group and exits; each kernel also has PR_SET_PDEATHSIG and
ipykernel's parent poller pointed at the server, so no kernel outlives it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any


__all__ = [
    "FORKSERVER_FOLDER_PREFIX",
    "KERNEL_MODULES",
    "ForkServer",
    "ForkServerError",
    "ForkServerProvisioner",
    "ForkedKernel",
    "interpreter_env",
    "runs_this_interpreter",
    "serve",
]

#: ``python -m <module>`` entry points the server can run in a forked child.
KERNEL_MODULES = ("ipykernel_launcher", "ipykernel")

# Imported by the server before it forks anything: what every kernel imports
# while it initialises (measured: the modules IPKernelApp.initialize() loads
# after ``import ipykernel.kernelapp``; debugpy alone is ~0.18 s), none of which
# starts a thread or creates a zmq context at import.
_PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.debugger",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.oinspect",
    "IPython.extensions.storemagic",
    "tornado.gen",
    "tornado.queues",
    "tornado.platform.asyncio",
    "psutil",
    "sqlite3",
    "faulthandler",
    "IPython.core.logger",
)

# Environment variables read only at process start (by the interpreter, the C
# runtime, or a preloaded module at import): a forked kernel cannot honour a
# change to them, so a request that differs from the server's start environment
# in any of them must get an ordinary kernel instead.
_INTERPRETER_ENV_PREFIXES = ("PYTHON", "LD_", "LC_", "DEBUGPY_", "PYDEVD_")
_INTERPRETER_ENV_NAMES = ("LANG",)
# jupyter_client strips this one from every kernel's environment.
_IGNORED_ENV_NAMES = ("PYTHONEXECUTABLE",)

# The server is started by file path so that ``import nbflow`` never runs in it.
_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_nbflow_forkserver', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module.serve(int(sys.argv[2]))\n"
)

_PR_SET_PDEATHSIG = 1

#: Prefix of the private folder (in the temp folder) of each fork server's socket.
FORKSERVER_FOLDER_PREFIX = "nbflow-forkserver-"

# What /proc/<pid>/environ shows (ps, psutil, and nbflow's reaper, which finds what a step started
# by its NBFLOW_* variables) is the block of memory the environment had when the process was
# exec'd: for a forked kernel, and for whatever it forks without exec, the server's. The server
# starts with this much room in that block, and each kernel writes its own environment into it.
_ENVIRON_ROOM_NAME = "NBFLOW_FORKSERVER_ENVIRON_ROOM"
_ENVIRON_ROOM = 32 * 1024


class ForkServerError(Exception):
    """The fork server cannot serve a request; the caller should start an ordinary kernel.

    ``reason`` says why in words (it ends up in ``StartedKernel.fallback_reason``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.reason,))


def runs_this_interpreter(executable: str) -> bool:
    """Whether ``executable`` is this interpreter in this environment.

    ``bin/python`` and ``bin/python3`` of one virtualenv are the same; the same
    binary linked from another virtualenv's ``bin`` is not (its site-packages differ).
    """
    here, there = os.path.abspath(sys.executable), os.path.abspath(executable)
    return os.path.dirname(here) == os.path.dirname(there) and os.path.realpath(here) == os.path.realpath(there)


def interpreter_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` that only takes effect when an interpreter starts."""
    return {
        name: value
        for name, value in env.items()
        if (name.startswith(_INTERPRETER_ENV_PREFIXES) or name in _INTERPRETER_ENV_NAMES)
        and name not in _IGNORED_ENV_NAMES
    }


# --------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------


class ForkedKernel:
    """Driver-side handle of one forked kernel: its pid and the connection that keeps it alive.

    The kernel is not our child, so its exit status comes from the server over
    the connection. Closing the handle makes the server kill the kernel's
    process group if it is still running.
    """

    def __init__(self, sock: socket.socket, pid: int, buffered: bytes) -> None:
        self.pid = pid
        self._sock = sock
        self._buffer = buffered
        self._returncode: int | None = None
        self._parse()

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def poll(self) -> int | None:
        """The kernel's exit code (negative: killed by that signal), or None while it runs."""
        while self._returncode is None and self._sock.fileno() != -1:
            try:
                chunk = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            self._feed(chunk)
        return self._returncode

    async def wait(self) -> int:
        """Wait until the kernel process has exited; return its exit code."""
        loop = asyncio.get_running_loop()
        while self.poll() is None:
            try:
                chunk = await loop.sock_recv(self._sock, 4096)
            except OSError:
                chunk = b""
            self._feed(chunk)
        assert self._returncode is not None
        return self._returncode

    def close(self) -> None:
        """Drop the connection; the server kills the kernel's process group if it still runs."""
        self._sock.close()

    async def specialize(self, cwd: str, env: Mapping[str, str]) -> None:
        """Give a warm fork its directory and environment: it takes them and starts serving."""
        line = json.dumps({"cwd": cwd, "env": dict(env)}).encode() + b"\n"
        await asyncio.get_running_loop().sock_sendall(self._sock, line)

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            # The server is gone; it killed its kernels on the way out (or, if it
            # was killed itself, PR_SET_PDEATHSIG did).
            self._returncode = -signal.SIGKILL
            self._sock.close()
            return
        self._buffer += chunk
        self._parse()

    def _parse(self) -> None:
        while b"\n" in self._buffer and self._returncode is None:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if "exit" in message:
                self._returncode = int(message["exit"])
                self._sock.close()


class ForkServer:
    """Driver-side owner of one fork-server process, started lazily and thread-safely.

    The server is valid only for this interpreter (``sys.executable``) and for
    the interpreter-level environment (:func:`interpreter_env`) it was started
    with; :meth:`unsupported_reason` tells when a request falls outside that.
    :meth:`shutdown` (also run at interpreter exit) kills every kernel it forked.
    """

    def __init__(self, *, connect_timeout: float = 60.0) -> None:
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._directory: tuple[str, int] | None = None  # (path, holder fd) of the socket's folder
        self._socket_path: str | None = None
        self._interpreter_env: dict[str, str] = {}
        self._closed = False
        self._broken: str | None = None  # why the server is not to be used any more

    @property
    def pid(self) -> int | None:
        """The server's pid once started."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the server process unless it runs already (returns without waiting for it)."""
        with self._lock:
            if self._closed:
                raise ForkServerError("the fork server has been shut down")
            if self._broken is not None:
                raise ForkServerError(self._broken)
            if self._process is not None:
                returncode = self._process.poll()
                if returncode is not None:
                    raise ForkServerError(f"the fork server exited unexpectedly (exit code {returncode})")
                return
            self._spawn()

    def unsupported_reason(self, executable: str, env: Mapping[str, str]) -> str | None:
        """Why a kernel running ``executable`` with ``env`` cannot be forked here, or None."""
        if not runs_this_interpreter(executable):
            return f"the kernel runs {executable}, the fork server runs {sys.executable}"
        self.start()
        requested = interpreter_env(env)
        differing = sorted(
            name
            for name in set(requested) | set(self._interpreter_env)
            if requested.get(name) != self._interpreter_env.get(name)
        )
        if differing:
            return (
                "environment variables read at interpreter start differ from the fork server's: "
                + ", ".join(differing)
            )
        return None

    async def fork_kernel(self, argv: Sequence[str], cwd: str, env: Mapping[str, str], *,
                          warm: bool = False) -> ForkedKernel:
        """Fork a kernel running ``argv`` (``python -m ipykernel_launcher ...``) in ``cwd`` with ``env``.

        ``warm``: the kernel initialises and then waits for :meth:`ForkedKernel.specialize` (its real
        directory and environment) before it serves.
        """
        self.start()
        assert self._socket_path is not None
        message: dict[str, Any] = {"argv": list(argv), "cwd": cwd, "env": dict(env)}
        if warm:
            message["warm"] = True
        request = json.dumps(message).encode() + b"\n"
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self._socket_path)
            await loop.sock_sendall(sock, request)
            reply = await asyncio.wait_for(self._read_line(sock), self._connect_timeout)
            line, rest = reply.split(b"\n", 1)
            message = json.loads(line)
            if "pid" not in message:
                raise ForkServerError(f"the fork server refused the kernel: {message.get('error')}")
            return ForkedKernel(sock, int(message["pid"]), rest)
        except TimeoutError:
            sock.close()
            self._broken = f"the fork server did not answer within {self._connect_timeout:g} s"
            raise ForkServerError(self._broken) from None
        except (OSError, ValueError) as error:
            sock.close()
            raise ForkServerError(f"cannot talk to the fork server: {error}") from error
        except BaseException:
            sock.close()
            raise

    def shutdown(self) -> None:
        """Stop the server; it kills the process group of every kernel it forked."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
            atexit.unregister(self.shutdown)
            if process is not None:
                assert process.stdin is not None
                process.stdin.close()  # EOF: the server kills its kernels and exits
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self._directory is not None:
                from nbflow.reaper import release_folder

                release_folder(*self._directory)
                self._directory = None

    def _spawn(self) -> None:
        # Driver side only: the server process never imports nbflow.
        from nbflow.reaper import private_folder, release_folder

        # Mode 0700: only we can connect. Removed by shutdown() or by the server when it exits, or
        # (when both were killed) by the next nbflow that starts a fork server.
        directory, holder = private_folder(FORKSERVER_FOLDER_PREFIX)
        socket_path = os.path.join(directory, "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(socket_path)
            # Listening before the server exists lets requests queue up while it
            # is still importing ipykernel.
            listener.listen(64)
            env = dict(os.environ)
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__), str(listener.fileno())],
                stdin=subprocess.PIPE,  # the server exits when this pipe closes
                env={**env, _ENVIRON_ROOM_NAME: " " * _ENVIRON_ROOM},
                pass_fds=(listener.fileno(),),
                start_new_session=True,  # Ctrl-C in a terminal is for the driver, not the server
            )
        except BaseException:
            release_folder(directory, holder)
            raise
        finally:
            listener.close()
        self._directory = (directory, holder)
        self._socket_path = socket_path
        self._interpreter_env = interpreter_env(env)
        atexit.register(self.shutdown)

    async def _read_line(self, sock: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        buffer = b""
        while b"\n" not in buffer:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                returncode = None if self._process is None else self._process.poll()
                raise ForkServerError(
                    "the fork server closed the connection"
                    + ("" if returncode is None else f" (it exited with code {returncode})")
                )
            buffer += chunk
        return buffer


def __getattr__(name: str) -> Any:
    if name == "ForkServerProvisioner":  # where it always was, for whoever imports it from here
        from nbflow.provisioner import ForkServerProvisioner

        return ForkServerProvisioner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------
# Server side (runs in the fork-server process)
# --------------------------------------------------------------------------


def serve(listen_fd: int) -> None:
    """Run the fork server on the listening Unix socket ``listen_fd`` until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ``python -c`` put '' first; a kernel gets its own cwd entry from IPython.
    base_path = [entry for entry in sys.path if entry != ""]
    env_before = dict(os.environ)
    _preload()
    # What the imports set in os.environ (debugpy does) is what they would have
    # set in an ordinary kernel: children re-apply it over their requested env.
    env_from_imports = {
        name: value for name, value in os.environ.items() if env_before.get(name) != value
    }
    _Server(socket.socket(fileno=listen_fd), base_path, env_from_imports).run()


def _preload() -> None:
    import gc
    import importlib

    # Import-time chatter (debugpy warns about frozen modules) is swallowed, as
    # an ordinary kernel swallows it into its not-yet-connected output stream.
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        for module in _PRELOAD:
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # an optional speed-up only; the kernel imports what it needs
    finally:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
    _warm_caches()
    gc.collect()
    gc.freeze()  # keep the shared pages shared: the children's GC never touches them


def _warm_caches() -> None:
    """Fill the process-wide caches a kernel's first cell fills, so that every fork inherits them.

    IPython tokenizes each cell; the first tokenize in a process compiles the
    tokenizer's regular expressions (~6 ms here), which every fresh kernel
    paid in its first cell. Only library caches: no shell, no state a kernel shows.
    """
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        TransformerManager().transform_cell("x = 1\n")
    except Exception:  # noqa: BLE001 - an optional speed-up only
        pass


class _Server:
    def __init__(
        self, listener: socket.socket, base_path: list[str], env_from_imports: dict[str, str]
    ) -> None:
        self._listener = listener
        self._base_path = base_path
        self._env_from_imports = env_from_imports
        self._pid = os.getpid()
        self._selector = selectors.DefaultSelector()
        self._requests: dict[socket.socket, bytes] = {}  # connection -> bytes read so far
        self._kernels: dict[int, socket.socket | None] = {}  # pid -> its connection, if open
        # warm forks not yet specialized: connection -> (write end of the child's pipe, bytes read so far)
        self._waiting: dict[socket.socket, tuple[int, bytes]] = {}
        self._wake_read, self._wake_write = os.pipe()
        self._running = True

    def run(self) -> None:
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        signal.set_wakeup_fd(self._wake_write)
        signal.signal(signal.SIGCHLD, _ignore_signal)
        signal.signal(signal.SIGTERM, _ignore_signal)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._selector.register(0, selectors.EVENT_READ, self._driver_readable)
        self._selector.register(self._wake_read, selectors.EVENT_READ, self._signalled)
        try:
            while self._running:
                for key, _ in self._selector.select():
                    key.data(key.fileobj)
        finally:
            self._kill_all()

    # -- events ---------------------------------------------------------------

    def _accept(self, _: Any) -> None:
        try:
            connection, _address = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        connection.setblocking(False)
        self._requests[connection] = b""
        self._selector.register(connection, selectors.EVENT_READ, self._connection_readable)

    def _driver_readable(self, _: Any) -> None:
        if not os.read(0, 4096):
            self._running = False  # the driver closed our stdin or died

    def _signalled(self, _: Any) -> None:
        try:
            signals = os.read(self._wake_read, 4096)
        except BlockingIOError:
            signals = b""
        if signal.SIGTERM in signals:
            self._running = False
        self._reap()

    def _connection_readable(self, connection: socket.socket) -> None:
        if connection.fileno() == -1:
            return  # dropped earlier in this round of events
        try:
            chunk = connection.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if connection in self._requests:
            if not chunk:
                self._drop(connection)
                return
            buffer = self._requests[connection] + chunk
            self._requests[connection] = buffer
            if b"\n" in buffer:
                del self._requests[connection]
                self._fork(connection, buffer.split(b"\n", 1)[0])
        elif chunk and connection in self._waiting:
            self._pass_on(connection, chunk)
        elif not chunk:
            # The driver let go of this kernel: kill it with everything it spawned.
            for pid, kernel_connection in self._kernels.items():
                if kernel_connection is connection:
                    _kill_group(pid)
                    self._kernels[pid] = None
                    break
            self._drop(connection)

    # -- actions --------------------------------------------------------------

    def _fork(self, connection: socket.socket, line: bytes) -> None:
        try:
            request = json.loads(line)
            argv = [str(arg) for arg in request["argv"]]
            cwd = str(request["cwd"])
            env = {str(name): str(value) for name, value in request["env"].items()}
            warm = bool(request.get("warm"))
            if len(argv) < 3 or argv[1] != "-m" or argv[2] not in KERNEL_MODULES:
                raise ValueError(f"not an ipykernel command line: {argv}")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self._send(connection, {"error": f"bad request: {error}"})
            self._drop(connection)
            return
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        later_r, later_w = os.pipe() if warm else (-1, -1)
        try:
            pid = os.fork()
        except OSError as error:
            if warm:
                os.close(later_r)
                os.close(later_w)
            self._send(connection, {"error": f"fork failed: {error}"})
            self._drop(connection)
            return
        if pid == 0:
            if warm:
                os.close(later_w)
            self._become_kernel(connection, argv, cwd, env, later_r)  # never returns
        if warm:
            os.close(later_r)
            self._waiting[connection] = (later_w, b"")
        self._kernels[pid] = connection
        self._send(connection, {"pid": pid})

    def _pass_on(self, connection: socket.socket, chunk: bytes) -> None:
        """A warm fork's directory and environment, from the driver: written to the fork's pipe once whole."""
        write_end, buffer = self._waiting[connection]
        buffer += chunk
        if b"\n" not in buffer:
            self._waiting[connection] = (write_end, buffer)
            return
        del self._waiting[connection]
        line = buffer.split(b"\n", 1)[0] + b"\n"
        try:
            os.set_blocking(write_end, True)
            view = memoryview(line)
            while view:
                view = view[os.write(write_end, view):]
        except OSError:
            pass  # the fork died meanwhile: its exit is reported as for any kernel
        finally:
            os.close(write_end)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            connection = self._kernels.pop(pid, None)
            if connection is not None:
                self._send(connection, {"exit": os.waitstatus_to_exitcode(status)})
                self._drop(connection)

    def _kill_all(self) -> None:
        for write_end, _ in self._waiting.values():
            os.close(write_end)
        self._waiting.clear()
        for pid in self._kernels:
            _kill_group(pid)
        for pid in list(self._kernels):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        for connection in [*self._requests, *filter(None, self._kernels.values())]:
            connection.close()
        self._kernels.clear()
        self._requests.clear()
        path = self._listener.getsockname()
        self._listener.close()
        if isinstance(path, str) and path:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def _send(self, connection: socket.socket, message: dict[str, Any]) -> None:
        try:
            connection.send(json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # the driver is gone; its connection will read as closed

    def _drop(self, connection: socket.socket) -> None:
        self._requests.pop(connection, None)
        waiting = self._waiting.pop(connection, None)
        if waiting is not None:
            os.close(waiting[0])  # the warm fork reads EOF and exits
        self._selector.unregister(connection)
        connection.close()

    # -- in the forked child --------------------------------------------------

    def _become_kernel(
        self, connection: socket.socket, argv: list[str], cwd: str, env: dict[str, str], later: int = -1
    ) -> None:
        """In the forked child: become the kernel (a warm fork reads its directory and environment from `later`)."""
        code: Any = 1
        try:
            os.setsid()  # own process group: interrupts and kills reach the kernel and its children
            _set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != self._pid:
                os._exit(1)  # the server died before the death signal was armed
            connection.close()
            self._leave_server()
            _prepare_process(cwd, {**self._env_from_imports, **env}, self._base_path)
            if later == -1:
                code = _run_kernel_app(argv, parent_pid=self._pid)
            else:
                code = _run_warm_kernel_app(argv, self._pid, later, self._env_from_imports, self._base_path)
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:  # noqa: BLE001 - whatever happens, the child must end in os._exit
            import traceback

            traceback.print_exc()
        finally:
            os._exit(_exit_status(code))

    def _leave_server(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._selector.close()
        self._listener.close()
        for connection in [*self._requests, *filter(None, self._kernels.values())]:
            connection.close()
        for write_end, _ in self._waiting.values():
            os.close(write_end)  # another warm fork's: only the server may hold it, or it never sees EOF
        os.close(self._wake_read)
        os.close(self._wake_write)
        # stdin is the driver's liveness pipe; a kernel reads nothing from stdin.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.modules.pop("_nbflow_forkserver", None)


def _ignore_signal(signum: int, frame: Any) -> None:
    """Python-level handler so the signal reaches the wakeup fd."""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _set_parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def _prepare_process(cwd: str, env: Mapping[str, str], base_path: list[str]) -> None:
    """Make this forked process look like a fresh ``python -m ipykernel_launcher`` in ``cwd``."""
    import importlib
    import time

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _show_environ(env)
    time.tzset()
    # As ipykernel_launcher leaves it; IPython then inserts '' (the cwd) before
    # site-packages, exactly as in an ordinary kernel.
    # NBFLOW_PYTHONPATH: the pipeline's `pythonpath`, where PYTHONPATH would put it in an ordinary kernel
    sys.path[:] = [p for p in env.get("NBFLOW_PYTHONPATH", "").split(os.pathsep) if p] + base_path
    importlib.invalidate_caches()
    # ``random`` reseeds itself in a forked child (os.register_at_fork); numpy
    # and other user-level libraries are never imported by the server.


def _show_environ(env: Mapping[str, str]) -> None:
    """Write ``env`` over the environment block this process was started with (what /proc shows).

    Safe once ``os.environ`` has been replaced: the C environment then holds
    copies, nothing points into the old block any more (setproctitle reuses it
    the same way). An environment larger than the block is left unshown.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end: fields 50 and 51 in proc(5)
    except (OSError, IndexError, ValueError):
        return
    block = b"".join(os.fsencode(name) + b"=" + os.fsencode(value) + b"\0" for name, value in env.items())
    if 0 < start < end and len(block) <= end - start:
        ctypes.memmove(start, block.ljust(end - start, b"\0"), end - start)


def _run_kernel_app(argv: list[str], *, parent_pid: int) -> Any:
    import importlib.util

    from ipykernel.kernelapp import IPKernelApp

    module = argv[2]
    spec = importlib.util.find_spec(f"{module}.__main__" if module == "ipykernel" else module)
    sys.argv = [spec.origin if spec and spec.origin else module, *argv[3:]]
    # parent_handle is read from JPY_PARENT_PID when ipykernel is imported, i.e.
    # in the server: pass it explicitly so the poller watches the server, our parent.
    IPKernelApp.launch_instance(argv=[*argv[3:], f"--IPKernelApp.parent_handle={parent_pid}"])
    return 0


# What IPKernelApp.initialize() does last: a warm fork does these once it has its directory and environment,
# since they run the user's start-up files and extensions, which may read either.
_AFTER_SPECIALIZING = ("init_gui_pylab", "init_extensions", "init_code")


def _run_warm_kernel_app(argv: list[str], parent_pid: int, later: int, env_from_imports: Mapping[str, str],
                         base_path: list[str]) -> Any:
    """Initialise the kernel, wait for its directory and environment on `later`, take them, then serve."""
    import importlib.util

    from ipykernel.kernelapp import IPKernelApp

    module = argv[2]
    spec = importlib.util.find_spec(f"{module}.__main__" if module == "ipykernel" else module)
    sys.argv = [spec.origin if spec and spec.origin else module, *argv[3:]]
    app = IPKernelApp.instance()
    for name in _AFTER_SPECIALIZING:
        setattr(app, name, _nothing)
    before = dict(os.environ)
    app.initialize([*argv[3:], f"--IPKernelApp.parent_handle={parent_pid}"])
    if app.shell is not None:
        # made on first use (the first cell's result, ~4 ms): made now, while this fork waits for its step
        app.shell.display_formatter.formatters  # noqa: B018
    # what initialising set in os.environ (TERM, PAGER, MPLBACKEND, ...), as it would have over the real one
    set_by_init = {name: value for name, value in os.environ.items() if before.get(name) != value}
    request = _read_line(later)
    os.close(later)
    if request is None:
        return 0  # the driver let go of this fork before using it
    message = json.loads(request)
    cwd, env = str(message["cwd"]), {str(k): str(v) for k, v in message["env"].items()}
    # a variable that initialising overwrote keeps its value; one it only set when absent yields to the request's
    final = {**env_from_imports, **env}
    final.update({name: value for name, value in set_by_init.items() if name in before or name not in env})
    initialised_path = list(sys.path)
    _prepare_process(cwd, final, base_path)
    if "" in initialised_path:  # where initialising put the working directory: before the same neighbour
        following = initialised_path[initialised_path.index("") + 1:]
        neighbour = next((entry for entry in following if entry in sys.path), None)
        sys.path.insert(sys.path.index(neighbour) if neighbour is not None else len(sys.path), "")
    shell = app.shell
    if shell is not None:
        history = getattr(shell, "history_manager", None)
        dir_hist = getattr(history, "dir_hist", None)
        if isinstance(dir_hist, list):  # _dh, %dhist: where the kernel started (a Path or a str, as IPython keeps it)
            dir_hist[:] = [type(dir_hist[0])(cwd) if dir_hist else cwd]
        session = env.get("JPY_SESSION_NAME")
        if session:
            shell.user_ns["__session__"] = session
        for name in _AFTER_SPECIALIZING:
            getattr(IPKernelApp, name)(app)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    app.start()
    return 0


def _nothing() -> None:
    pass


def _read_line(fd: int) -> bytes | None:
    """One line from a blocking file descriptor, or None at end of file before a whole line."""
    buffer = b""
    while b"\n" not in buffer:
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buffer += chunk
    return buffer.split(b"\n", 1)[0]


def _exit_status(code: Any) -> int:
    """Run exit handlers like a normal interpreter exit; return the process exit status."""
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1
