"""`accelctl env`: versions, backends, devices, relevant variables and common traps."""

from __future__ import annotations

from typing import Any

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json


def env_command(json_out: JsonOut = None, debug: Debug = False) -> None:
    """Print a paste-ready report of this machine's JAX setup (--json for the fields)."""

    def go() -> dict[str, Any]:
        from accelctl.envreport import env_report

        return env_report()

    report = run_guarded(go, debug=debug)
    if not write_json(report, json_out):
        from accelctl.envreport import format_env_report

        print(format_env_report(report))
