"""Following a running job from the operator's terminal (rich progress: rows/s and ETA)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vfl.config import PartyConfig
from vfl.service.admin import admin_call


def follow_job(config: PartyConfig, job_id: str, *, poll_s: float = 1.0) -> dict[str, Any]:
    """Poll the service's status until ``job_id`` is done or failed; return its last status."""
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.fields[steps]}"),
        TextColumn("{task.fields[rate]} rows/s"),
        TextColumn("{task.fields[val]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=None, rate="-", val="", steps="-")
        while True:
            job = admin_call(config, "status").get("jobs", {}).get(job_id, {})
            state = job.get("state", "unknown")
            val = job.get("validation", {})
            bar.update(
                task,
                description=f"{job_id} [{job.get('phase', state)}] epoch {job.get('epoch', '-')}",
                completed=job.get("step", 0),
                total=job.get("total_steps") or None,
                rate=f"{job.get('rows_per_s', 0):.0f}",
                steps=f"{job.get('step', 0)}/{job.get('total_steps', '?')}",
                val=f"val AUC {val['roc_auc']:.4f}" if "roc_auc" in val else "",
            )
            if state in ("done", "failed"):
                final: dict[str, Any] = job
                return final
            time.sleep(poll_s)
