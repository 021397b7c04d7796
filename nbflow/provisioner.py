"""The jupyter_client kernel provisioner that launches kernels through nbflow's fork server.

Owns: :class:`ForkServerProvisioner`, through which an ``AsyncKernelManager``
launches (or, for a warm fork, launches and later specializes), signals,
polls and kills a forked kernel. Apart from :mod:`nbflow.forkserver` itself
(which must not import jupyter_client: the server is started before anything
else of a run is ready), nothing here starts or chooses kernels.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from jupyter_client.provisioning import LocalProvisioner

from nbflow.forkserver import KERNEL_MODULES, ForkedKernel, ForkServer, ForkServerError

if TYPE_CHECKING:
    from jupyter_client.connect import KernelConnectionInfo

__all__ = ["ForkServerProvisioner"]


class ForkServerProvisioner(LocalProvisioner):  # type: ignore[misc]
    """Launches a kernel through a :class:`ForkServer` instead of ``Popen``.

    Everything before the launch (ports, connection file, command line) is
    LocalProvisioner's; the process is tracked through its :class:`ForkedKernel`
    and signalled as a process group, like LocalProvisioner does. Set
    :attr:`fork_server` before the manager starts the kernel.
    """

    fork_server: ForkServer | None = None
    forked: ForkedKernel | None = None
    warm: bool = False  # launch a warm fork: it waits for specialize() before it serves

    @property
    def has_process(self) -> bool:
        return self.forked is not None

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        if self.fork_server is None:
            raise ForkServerError("no fork server was given to the provisioner")
        if len(cmd) < 3 or cmd[1] != "-m" or cmd[2] not in KERNEL_MODULES:
            raise ForkServerError(f"the kernel command {cmd} is not 'python -m ipykernel_launcher'")
        env = dict(kwargs.get("env") or os.environ)
        env["JPY_PARENT_PID"] = str(os.getpid())  # as jupyter_client's launcher sets it
        reason = self.fork_server.unsupported_reason(cmd[0], env)
        if reason is not None:
            raise ForkServerError(reason)
        cwd = str(kwargs.get("cwd") or os.getcwd())
        self.forked = await self.fork_server.fork_kernel(cmd, cwd, env, warm=self.warm)
        self.pid = self.pgid = self.forked.pid
        self.cwd = cwd
        return self.connection_info

    async def specialize(self, cwd: str, env: Mapping[str, str]) -> None:
        """A warm fork's real directory and environment (JPY_PARENT_PID set as for a launch)."""
        if self.forked is None or not self.warm:
            raise ForkServerError("not a warm fork")
        env = {**env, "JPY_PARENT_PID": str(os.getpid())}
        await self.forked.specialize(cwd, env)
        self.cwd = cwd

    async def poll(self) -> int | None:
        return 0 if self.forked is None else self.forked.poll()

    async def wait(self) -> int | None:
        if self.forked is None:
            return 0
        returncode = await self.forked.wait()
        self.forked.close()
        self.forked = None
        return returncode

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's process group (the kernel and whatever it spawned)."""
        if self.forked is not None and self.pgid:
            os.killpg(self.pgid, signum)

    async def kill(self, restart: bool = False) -> None:
        await self._signal_if_running(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self._signal_if_running(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if self.forked is not None:
            self.forked.close()
            self.forked = None

    async def _signal_if_running(self, signum: int) -> None:
        try:
            await self.send_signal(signum)
        except ProcessLookupError:
            pass  # already gone
