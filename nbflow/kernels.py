"""Fresh Jupyter kernels for steps, started fast and stopped completely.

This module owns
- :class:`KernelRequest`, what a step needs from a kernel (name, working
  directory, extra environment), and :class:`KernelStartError`;
- whether a kernel is installed (kernel specs only, nothing is started);
- :func:`start_kernel`: a kernel whose client is connected and ready, forked
  from the fork server (:mod:`nbflow.forkserver`) when the kernel spec runs this
  very interpreter with ipykernel, an ordinary jupyter_client
  ``AsyncKernelManager`` kernel otherwise or when forking fails;
- :class:`StartedKernel`, whose :meth:`~StartedKernel.stop` kills the kernel's
  whole process group at once;
- :class:`KernelPool`, which keeps warm forks ready (kernels initialised by the fork server that take
  their step's directory and environment when handed out, so any step can have one) and starts a new
  one the moment one is taken; and, for kernels that cannot be forked, starts kernels ahead of time
  for steps about to run;
- the private folder of the kernels' connection files (with their HMAC keys)
  and socket files: one per pool, removed when the pool closes, and removed by
  the next nbflow when this one was killed (:func:`nbflow.reaper.private_folder`).

It never executes notebook cells (the executor drives nbclient with
``StartedKernel.km`` / ``.kc``), never reuses a kernel for a second step, and
never prints. jupyter_client and zmq are imported only when a kernel is needed.
Whether to fork is decided once per run (``nbflow.settings``) and passed in.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbflow.errors import NbflowError, did_you_mean

if TYPE_CHECKING:
    from jupyter_client.asynchronous import AsyncKernelClient
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    from nbflow.forkserver import ForkServer

__all__ = [
    "KERNELS_FOLDER_PREFIX",
    "KernelPool",
    "KernelRequest",
    "KernelStartError",
    "StartedKernel",
    "installed_kernels",
    "kernel_installed",
    "start_kernel",
]

_log = logging.getLogger("nbflow")

#: Folders (os.pathsep-separated) a kernel puts first on sys.path: the pipeline's `pythonpath`.
PYTHONPATH_ENV = "NBFLOW_PYTHONPATH"

#: Seconds a kernel may take from launch to answering kernel_info.
STARTUP_TIMEOUT = 60.0

# zmq retries a refused connection every 100 ms by default; a kernel binds its
# ports a few ms after it is launched, so retry much sooner.
_RECONNECT_INTERVAL_MS = 5
# iopub drops what the kernel publishes before our subscription reaches it:
# once kernel_info has been answered, ask again this often until an idle status
# for one of our requests shows that iopub is connected too.
_RESEND_INTERVAL = 0.01
# A kernel that answers kernel_info but publishes no idle status (against the
# protocol) is taken as ready after this long.
_IOPUB_GRACE = 2.0
# How often a starting kernel is checked for having died.
_ALIVE_CHECK_INTERVAL = 0.05
# stop(): poll interval, and the longest wait for a SIGKILLed process to go.
_EXIT_POLL_INTERVAL = 0.005
_EXIT_TIMEOUT = 5.0

_PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}


@dataclass(frozen=True)
class KernelRequest:
    """The kernel a step runs in: which kernel, in which directory, with which extra environment."""

    kernel_name: str
    cwd: str  # absolute
    env: Mapping[str, str] = field(default_factory=dict)


class KernelStartError(NbflowError):
    """A kernel could not be started; the message says why and how to fix it."""

    def __init__(self, kernel_name: str, message: str) -> None:
        super().__init__(message)
        self.kernel_name = kernel_name
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.kernel_name, self.message))


def installed_kernels() -> list[str]:
    """Names of the installed kernels (kernel specs), sorted."""
    from jupyter_client.kernelspec import KernelSpecManager

    return sorted(KernelSpecManager().find_kernel_specs())


def kernel_installed(kernel_name: str) -> bool:
    """Whether a kernel spec named ``kernel_name`` is installed (no kernel is started)."""
    return kernel_name in installed_kernels()


@dataclass
class StartedKernel:
    """A running kernel with a connected, ready client. Use it for one step, then :meth:`stop` it."""

    km: AsyncKernelManager
    kc: AsyncKernelClient
    mode: str  # "forkserver" or "ordinary"
    fallback_reason: str | None
    pid: int
    _stopped: bool = field(default=False, init=False, repr=False)

    async def stop(self) -> None:
        """Kill the kernel and everything it spawned (SIGKILL to its process group), release its resources.

        Quick by design: no shutdown request, no grace period; the executed
        notebook lives in the driver and is saved already.
        """
        if self._stopped:
            return
        self._stopped = True
        self.kc.stop_channels()
        await _kill_and_release(self.km)

    async def interrupt(self) -> None:
        """Interrupt the running cell (SIGINT to the kernel's process group)."""
        await self.km.interrupt_kernel()


async def start_kernel(request: KernelRequest, *, use_forkserver: bool = True) -> StartedKernel:
    """Start a fresh kernel for ``request`` and return it connected and ready.

    Forks it from this process's fork server when ``use_forkserver`` and the
    kernel spec runs this interpreter
    with ipykernel; otherwise, or when forking fails for any reason, starts an
    ordinary kernel and records why in ``fallback_reason``.
    """
    disabled = _forkserver_disabled_reason(use_forkserver)
    server = None if disabled else _shared_fork_server()
    return await _start(request, server, disabled, _process_folder())


class KernelPool:
    """Keeps kernels ready before steps ask for them (bounded).

    Warm forks (:meth:`keep_warm`): kernels forked and initialised by the fork
    server without a step, which take the step's directory and environment
    when :meth:`acquire` hands one out; the pool starts the next one at that
    moment. Kernels that cannot be forked (another interpreter, fork server
    off) are started ahead of time per step instead (:meth:`prestart`).

    All methods are called from ONE asyncio event loop (the executor's). Each
    kernel is handed out at most once; the pool owns its fork server (started
    on first use) and stops it in :meth:`close`, with every kernel not handed out.
    """

    def __init__(self, *, max_prestarted: int, use_forkserver: bool = True, forkserver_off: str | None = None) -> None:
        self._max_prestarted = max_prestarted
        self._use_forkserver = use_forkserver
        self._forkserver_off = forkserver_off
        self._fork_server: ForkServer | None = None
        self._prestarted: dict[str, tuple[KernelRequest, asyncio.Task[StartedKernel]]] = {}
        self._warm: list[asyncio.Task[_WarmFork | None]] = []  # oldest first
        self._warm_count = 0
        self._warm_kernel = "python3"
        self._folder: tuple[str, int] | None = None  # (path, holder fd) of its kernels' files
        # kernels of finished attempts being stopped (and their steps' leftovers reaped), by step key
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def keep_warm(self, count: int = 1, kernel_name: str = "python3") -> None:
        """Keep ``count`` warm forks of ``kernel_name`` ready from now on (the fork server starts now).

        A no-op when that kernel cannot be forked or the fork server is off: then
        :meth:`prestart` hints are what starts kernels ahead of time.
        """
        if self._closed or _forkserver_disabled_reason(self._use_forkserver, self._forkserver_off):
            return
        self._warm_count, self._warm_kernel = count, kernel_name
        self._server().start()  # its boot (importing ipykernel) overlaps what the run does before its first step
        self._refill()

    def prestart(self, key: str, request: KernelRequest) -> None:
        """Make a kernel ready for step ``key`` in the background (no-op if full, present or closed).

        A warm fork is given the step's directory and environment at once (so the step finds its kernel
        ready, not merely warm); other kernels are started for it.
        """
        if self._closed or key in self._prestarted or len(self._prestarted) >= self._max_prestarted:
            return
        task = asyncio.get_running_loop().create_task(self._prestarting(key, request),
                                                      name=f"prestart kernel for {key}")
        self._prestarted[key] = (request, task)

    async def _prestarting(self, key: str, request: KernelRequest) -> StartedKernel:
        await self._stopped(key)  # its last attempt's leftovers are reaped by the step's identity: first
        return await (self._ready_for(request) if self._serves(request) else self._start(request))

    async def acquire(self, key: str, request: KernelRequest) -> StartedKernel:
        """The kernel prestarted for ``key`` if it was started for an equal request, else a warm fork that
        takes the request's directory and environment, else a new one.

        Waits until the kernel of the step's previous attempt is stopped (:meth:`stop_later`).
        """
        if self._closed:
            raise RuntimeError("the kernel pool is closed")
        await self._stopped(key)
        prestarted = self._prestarted.pop(key, None)
        if prestarted is not None:
            prestarted_request, task = prestarted
            if prestarted_request == request:
                try:
                    started = await asyncio.shield(task)  # a cancel of the step is the step's, not lost in it
                except KernelStartError:
                    pass  # start again below: the failure may have been transient
                except asyncio.CancelledError:
                    self._prestarted.setdefault(key, prestarted)  # the pool stops it when it closes
                    raise
                else:
                    if await started.km.is_alive():
                        return started
                    await started.stop()  # died while waiting in the pool
            else:
                await _discard_start(task)
        if self._serves(request):
            warm = await self._take_warm(request)
            if warm is not None:
                return warm
        return await self._start(request)

    def stop_later(self, key: str, stopping: Coroutine[Any, Any, None]) -> None:
        """Run ``stopping`` (stop the kernel of step ``key``'s finished attempt, reap what it left) in the
        background: the step's outcome does not wait for it, the next step's kernel is ready meanwhile.

        A new attempt of the same step waits for it in :meth:`acquire` (the reaping finds processes by the
        step's identity, which the new attempt's kernel has too), and :meth:`close` waits for all of them.
        """
        task = asyncio.get_running_loop().create_task(stopping, name=f"stop kernel of {key}")
        self._stopping[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._stopping.get(key) is finished:
                del self._stopping[key]
            if not finished.cancelled() and finished.exception() is not None:
                _log.warning("stopping the kernel of step %s failed: %r", key, finished.exception())

        task.add_done_callback(done)

    async def _stopped(self, key: str) -> None:
        stopping = self._stopping.get(key)
        if stopping is not None:
            await asyncio.wait([stopping])  # its failure is logged, not the waiter's

    async def _ready_for(self, request: KernelRequest) -> StartedKernel:
        started = await self._take_warm(request)
        return started if started is not None else await self._start(request)

    def _serves(self, request: KernelRequest) -> bool:
        """Whether warm forks are kept for this request's kernel."""
        return self._warm_count > 0 and request.kernel_name == self._warm_kernel

    def _refill(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed and len(self._warm) < self._warm_count:
            self._warm.append(loop.create_task(self._start_warm(self._warm_kernel), name="warm fork"))

    async def _start_warm(self, kernel_name: str) -> _WarmFork | None:
        """A warm fork; None (and no more of them) when this kernel cannot be forked."""
        try:
            spec = _kernel_spec(kernel_name)
            if _unforkable_reason(spec) is not None:
                self._warm_count = 0
                return None
            env = dict(os.environ)
            km = _manager(kernel_name, self._folder_path(), self._server(), warm=True)
            try:
                await km.start_kernel(cwd=self._folder_path(), env=env, extra_arguments=_extra_arguments(km))
                # connected now, while it waits: its sockets are bound, and iopub is subscribed long before the
                # step's first request, so that readiness is one round trip
                kc = _client(km)
            except BaseException:
                await _kill_and_release(km)
                raise
        except Exception:  # noqa: BLE001 - the step that asks starts its kernel as it would without the pool
            self._warm_count = 0
            return None
        return _WarmFork(km, kc, kernel_name, _startup_env(env))

    async def _take_warm(self, request: KernelRequest) -> StartedKernel | None:
        """The oldest warm fork, given the request's directory and environment and ready; None if it cannot be."""
        cwd = os.path.abspath(request.cwd)
        if not self._warm or not os.path.isdir(cwd):
            return None
        task = self._warm.pop(0)
        self._refill()  # the next step's kernel starts now, before anyone asks
        try:
            # shielded: a step cancelled while its fork still starts must see its cancel, and the fork is not
            # cancelled with it (it goes back to the pool, which kills what is left when it closes)
            warm = await asyncio.shield(task)
        except asyncio.CancelledError:
            self._warm.insert(0, task)
            raise
        if warm is None:
            return None
        env = {**os.environ, **request.env}
        assert self._fork_server is not None
        from nbflow.forkserver import ForkServerError

        try:
            if (_startup_env(env) != warm.startup_env or not await warm.km.is_alive()
                    or self._fork_server.unsupported_reason(sys.executable, env) is not None):
                raise ForkServerError("the warm fork does not fit this request")
            await warm.km.provisioner.specialize(cwd, env)  # type: ignore[union-attr]
        except BaseException as e:
            warm.kc.stop_channels()
            await asyncio.shield(_kill_and_release(warm.km))
            if isinstance(e, (ForkServerError, OSError)):
                return None  # the step gets a kernel started for it
            raise
        try:
            return await _connected(warm.km, warm.kernel_name, "forkserver", None, warm.kc)
        except KernelStartError:
            return None  # it died on the way: the step gets a kernel started for it

    def _server(self) -> ForkServer:
        if self._fork_server is None:
            from nbflow.forkserver import ForkServer

            self._fork_server = ForkServer()
        return self._fork_server

    def _folder_path(self) -> str:
        if self._folder is None:
            from nbflow.reaper import private_folder

            self._folder = private_folder(KERNELS_FOLDER_PREFIX)
        return self._folder[0]

    async def close(self) -> None:
        """Stop every kernel started ahead of time and not acquired; shut down the fork server; remove the files.

        Shutting down the fork server kills the kernels it forked, so a kernel
        acquired from this pool and not stopped yet does not outlive the pool either.
        """
        self._closed = True
        while self._stopping:  # a step that ends meanwhile adds its kernel's stop: waited for too
            await asyncio.wait(list(self._stopping.values()))
        prestarted, self._prestarted = self._prestarted, {}
        warm, self._warm = self._warm, []
        await asyncio.gather(*(_discard_start(task) for _, task in prestarted.values()),
                             *(_discard_warm(task) for task in warm))
        if self._fork_server is not None:
            self._fork_server.shutdown()
        if self._folder is not None:
            from nbflow.reaper import release_folder

            release_folder(*self._folder)
            self._folder = None

    async def _start(self, request: KernelRequest) -> StartedKernel:
        disabled = _forkserver_disabled_reason(self._use_forkserver, self._forkserver_off)
        server = None if disabled else self._server()
        return await _start(request, server, disabled, self._folder_path())


@dataclass
class _WarmFork:
    """A kernel forked and initialised without a step: it serves once given a directory and an environment."""

    km: AsyncKernelManager
    kc: AsyncKernelClient  # connected already
    kernel_name: str
    startup_env: dict[str, str]  # what of its environment it read while initialising


# Read while a kernel initialises (interpreter, locale, IPython's profile and history, Jupyter's paths):
# a warm fork serves only requests that agree with it on these. The rest of the environment it takes later.
_STARTUP_ENV_PREFIXES = ("IPYTHON", "JUPYTER", "XDG_")
_STARTUP_ENV_NAMES = ("HOME",)


def _startup_env(env: Mapping[str, str]) -> dict[str, str]:
    from nbflow.forkserver import interpreter_env

    found = {name: value for name, value in env.items()
             if name.startswith(_STARTUP_ENV_PREFIXES) or name in _STARTUP_ENV_NAMES}
    return {**found, **interpreter_env(env)}


# --------------------------------------------------------------------------
# Starting
# --------------------------------------------------------------------------

_shared_server: ForkServer | None = None
_shared_server_lock = threading.Lock()


def _shared_fork_server() -> ForkServer:
    """The fork server :func:`start_kernel` uses: one per process, shut down at exit."""
    global _shared_server
    with _shared_server_lock:
        if _shared_server is None:
            from nbflow.forkserver import ForkServer

            _shared_server = ForkServer()
        return _shared_server


def _forkserver_disabled_reason(use_forkserver: bool, why: str | None = None) -> str | None:
    if not use_forkserver:
        return f"fork server turned off ({why or 'use_forkserver=False'})"
    return None


async def _start(
    request: KernelRequest, server: ForkServer | None, fallback_reason: str | None, folder: str
) -> StartedKernel:
    name = request.kernel_name
    spec = _kernel_spec(name)
    cwd = os.path.abspath(request.cwd)
    if not os.path.isdir(cwd):
        raise KernelStartError(name, f"cannot start kernel '{name}': its working directory {cwd} does not exist")
    env = {**os.environ, **request.env}
    if server is not None:
        fallback_reason = _unforkable_reason(spec)
        if fallback_reason is None:
            from nbflow.forkserver import ForkServerError

            try:
                return await _launch(name, cwd, env, server, None, folder)
            except ForkServerError as error:
                fallback_reason = error.reason
            except KernelStartError as error:
                fallback_reason = f"the forked kernel failed to start: {error.message}"
    return await _launch(name, cwd, env, None, fallback_reason, folder)


def _kernel_spec(kernel_name: str) -> KernelSpec:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        return manager.get_kernel_spec(kernel_name)
    except NoSuchKernel:
        installed = sorted(manager.find_kernel_specs())
        raise KernelStartError(
            kernel_name,
            f"kernel '{kernel_name}' is not installed{did_you_mean(kernel_name, installed)}; "
            f"installed kernels: {', '.join(installed) or 'none'} "
            "(install it, e.g. with `python -m ipykernel install --user --name NAME`, "
            "or choose an installed kernel)",
        ) from None


def _unforkable_reason(spec: KernelSpec) -> str | None:
    """Why a kernel with this spec cannot come from this process's fork server, or None."""
    from nbflow.forkserver import KERNEL_MODULES, runs_this_interpreter

    if "kernel_provisioner" in (spec.metadata or {}):
        return "the kernel spec names its own kernel provisioner"
    argv = list(spec.argv)
    if len(argv) < 3 or argv[1] != "-m" or argv[2] not in KERNEL_MODULES:
        return f"the kernel spec runs {argv}, not 'python -m ipykernel_launcher'"
    if argv[0] not in _PYTHON_NAMES and not runs_this_interpreter(argv[0]):
        return f"the kernel spec runs {argv[0]}, not this interpreter ({sys.executable})"
    return None


async def _launch(
    kernel_name: str,
    cwd: str,
    env: dict[str, str],
    server: ForkServer | None,
    fallback_reason: str | None,
    folder: str,
) -> StartedKernel:
    km = _manager(kernel_name, folder, server)
    if server is None and env.get(PYTHONPATH_ENV):
        # an ordinary kernel reads PYTHONPATH when its interpreter starts; a forked one is given the
        # folders by the fork server instead (a changed PYTHONPATH would make it refuse to fork)
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, (env[PYTHONPATH_ENV], env.get("PYTHONPATH"))))}
    try:
        await km.start_kernel(cwd=cwd, env=env, extra_arguments=_extra_arguments(km))
    except BaseException:
        await _kill_and_release(km)
        raise
    return await _connected(km, kernel_name, "ordinary" if server is None else "forkserver", fallback_reason)


def _extra_arguments(km: AsyncKernelManager) -> list[str]:
    """What the kernel's command line gets besides its spec's argv: IPython's history in memory, as nbclient
    (so papermill) starts an IPython kernel. A step's cells are not a session to recall; the default file,
    one per user, would take a SQLite write per cell, shared by every kernel running at once."""
    return ["--HistoryManager.hist_file=:memory:"] if km.ipykernel else []


def _manager(kernel_name: str, folder: str, server: ForkServer | None, *, warm: bool = False) -> AsyncKernelManager:
    """A kernel manager on Unix sockets in `folder`, launching through `server` when given (a warm fork: `warm`)."""
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    km.kernel_id = km.kernel_id or _new_kernel_id()
    # Unix sockets instead of TCP: no free-port search (so no port races between parallel starts), and
    # no "running over TCP without encryption" warning from every kernel. The socket files and the
    # connection file live in a private folder, not in the notebook's folder (jupyter_client's default
    # for sockets) nor loose in the temp folder (its default for connection files), so that what a
    # killed nbflow leaves is removed as one folder by the next one.
    km.transport = "ipc"
    km.ip = os.path.join(folder, km.kernel_id)
    km.connection_file = os.path.join(folder, f"kernel-{km.kernel_id}.json")
    if server is not None:
        from nbflow.provisioner import ForkServerProvisioner

        provisioner = ForkServerProvisioner(kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, parent=km)
        provisioner.fork_server = server
        provisioner.warm = warm
        km.provisioner = provisioner
    return km


def _client(km: AsyncKernelManager) -> AsyncKernelClient:
    """A client of the kernel, its channels started."""
    import zmq

    kc = km.client()
    kc.context.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_INTERVAL_MS)
    kc.start_channels(hb=False)  # liveness comes from the process, not heartbeats
    return kc


async def _connected(km: AsyncKernelManager, kernel_name: str, mode: str, fallback_reason: str | None,
                     kc: AsyncKernelClient | None = None) -> StartedKernel:
    """The launched kernel with a connected client (`kc`, or a new one), once it is ready (killed if it never is)."""
    try:
        if kc is None:
            kc = _client(km)
        await _wait_until_ready(km, kc, kernel_name)
    except BaseException:
        if kc is not None:
            kc.stop_channels()
        await _kill_and_release(km)
        raise
    pid = getattr(km.provisioner, "pid", None)  # both provisioners used here have one
    assert pid is not None
    return StartedKernel(km=km, kc=kc, mode=mode, fallback_reason=fallback_reason, pid=int(pid))


#: Prefix of the private folders (in the temp folder) that hold the kernels' connection and socket files.
KERNELS_FOLDER_PREFIX = "nbflow-kernels-"

_process_folder_path: str | None = None


def _process_folder() -> str:
    """The private folder of the kernels :func:`start_kernel` starts, removed when the interpreter exits."""
    global _process_folder_path
    if _process_folder_path is None or not os.path.isdir(_process_folder_path):
        import atexit

        from nbflow.reaper import private_folder, release_folder

        _process_folder_path, holder = private_folder(KERNELS_FOLDER_PREFIX)
        atexit.register(release_folder, _process_folder_path, holder)
    return _process_folder_path


def _new_kernel_id() -> str:
    import uuid

    return str(uuid.uuid4())


async def _wait_until_ready(km: AsyncKernelManager, kc: AsyncKernelClient, kernel_name: str) -> None:
    """Return once kernel_info has been answered on shell and its idle status seen on iopub.

    No fixed sleeps: the first request waits in the shell socket's queue until
    the kernel binds; only iopub can lose messages (before our subscription
    arrives), so kernel_info is re-sent until an idle status comes through. A
    kernel that never publishes idle counts as ready a while after its reply.
    """
    from queue import Empty

    import zmq
    from zmq.asyncio import Poller

    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    poller = Poller()
    poller.register(kc.shell_channel.socket, zmq.POLLIN)
    poller.register(kc.iopub_channel.socket, zmq.POLLIN)
    requests = {kc.kernel_info()}
    sent_at = loop.time()
    next_alive_check = sent_at + _ALIVE_CHECK_INTERVAL
    replied_at: float | None = None
    idle = False
    while not (replied_at is not None and (idle or loop.time() - replied_at >= _IOPUB_GRACE)):
        now = loop.time()
        if now >= deadline:
            raise KernelStartError(
                kernel_name,
                f"kernel '{kernel_name}' did not answer within {STARTUP_TIMEOUT:g} s of starting; "
                "see its output on stderr",
            )
        if now >= next_alive_check:
            if not await km.is_alive():
                assert km.provisioner is not None
                code = await km.provisioner.poll()
                raise KernelStartError(
                    kernel_name,
                    f"kernel '{kernel_name}' died while starting (exit code {code}); see its output on stderr",
                )
            next_alive_check = now + _ALIVE_CHECK_INTERVAL
        if replied_at is not None and now - sent_at >= _RESEND_INTERVAL:
            requests.add(kc.kernel_info())
            sent_at = now
        wake_at = min(deadline, next_alive_check, sent_at + _RESEND_INTERVAL if replied_at is not None else deadline)
        await poller.poll(max(1, int((wake_at - now) * 1000) + 1))
        for channel in (kc.shell_channel, kc.iopub_channel):
            while True:
                try:
                    message = await channel.get_msg(timeout=0)
                except Empty:
                    break
                if message["parent_header"].get("msg_id") not in requests:
                    continue
                if message["msg_type"] == "kernel_info_reply":
                    replied_at = loop.time() if replied_at is None else replied_at
                elif message["msg_type"] == "status" and message["content"].get("execution_state") == "idle":
                    idle = True


async def _kill_and_release(km: AsyncKernelManager) -> None:
    """SIGKILL the kernel's process group, wait briefly for it to go, free ports, files and sockets."""
    provisioner = km.provisioner
    if provisioner is not None and provisioner.has_process:
        try:
            await provisioner.kill()
        except (OSError, ValueError):
            pass  # already gone
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _EXIT_TIMEOUT
        while await provisioner.poll() is None and loop.time() < deadline:
            await asyncio.sleep(_EXIT_POLL_INTERVAL)
        if await provisioner.poll() is not None:
            await provisioner.wait()
    await km.cleanup_resources()


async def _discard_warm(task: asyncio.Task[_WarmFork | None]) -> None:
    """Kill a warm fork nobody took, cancelling its start if it is still going."""
    if not task.done():
        task.cancel()
    await asyncio.wait([task])
    if task.cancelled() or task.exception() is not None or task.result() is None:
        return
    warm = task.result()
    assert warm is not None
    warm.kc.stop_channels()
    await _kill_and_release(warm.km)


async def _discard_start(task: asyncio.Task[StartedKernel]) -> None:
    """Stop the kernel a start task produced, cancelling the start if it is still running."""
    if not task.done():
        task.cancel()
    await asyncio.wait([task])
    if task.cancelled() or task.exception() is not None:
        return  # a cancelled or failed start cleans up after itself
    await task.result().stop()
