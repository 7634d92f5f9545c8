"""The pipeline's run report: Markdown and HTML side by side, with the pictures a person looks at.

    <pipeline>/report/report.md, report.html, search_fid.png, final_fid.png, final_samples.png, served.png

Made in a local folder, then published to the pipeline's storage location (report.html last).
"""

from __future__ import annotations

import html
import shutil
import ssl
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import storage


def _final_curve(run_dir: str, out: Path) -> bool:
    """fid_domain (or fid) against step of the final run, from its TensorBoard events."""
    # tensorboard and matplotlib (seconds to import) only when a report is written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with storage.local_dir(storage.join(run_dir, "tensorboard")) as events:
        acc = EventAccumulator(str(events))
        acc.Reload()
    tags = [t for t in ("fid_domain", "fid") if t in acc.Tags().get("scalars", [])]
    if not tags:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = sorted({e.step: e.value for e in acc.Scalars(tags[0])}.items())
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in events], [v for _, v in events], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel(tags[0])
    ax.set_title(f"{tags[0]} of G_ema during the search trial and its continuation")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    if not rows:
        return "", ""
    cols = list(rows[0])
    fmt = [[("" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r[c])) for c in cols]
           for r in rows]
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in fmt)
    th = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in fmt)
    return md, f"<table><tr>{th}</tr>{trs}</table>"


def write(root: str, *, search: dict, final: dict, fid: dict, url: str, stages: dict[str, float],
          api_key: str | None = None, audit: dict | None = None, privacy: dict | None = None,
          ca_file: str | None = None) -> str:
    """Write <root>/report/ (root: any storage location); returns the URI of report.html. ca_file: the
    certificate to trust when the live endpoint speaks HTTPS with a self-signed one."""
    out = Path(tempfile.mkdtemp(prefix="aigc_report_"))
    try:
        _write(out, search=search, final=final, fid=fid, url=url, stages=stages, api_key=api_key, audit=audit or {},
               privacy=privacy, ca_file=ca_file)
        dest = storage.join(root, "report")
        storage.publish_dir(out, dest, last="report.html")
        return storage.join(dest, "report.html")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _write(out: Path, *, search: dict, final: dict, fid: dict, url: str, stages: dict[str, float],
           api_key: str | None, audit: dict, privacy: dict | None, ca_file: str | None = None) -> None:
    pics: list[tuple[str, str]] = []
    search_png = storage.join(search["search"], "fid_vs_step.png")
    if storage.exists(search_png):
        (out / "search_fid.png").write_bytes(storage.read_bytes(search_png))
        pics.append(("search_fid.png", f"{search['metric']} against step, every trial of the search"))
    if _final_curve(final["run_dir"], out / "final_fid.png"):
        pics.append(("final_fid.png", "the winner, trained longer"))
    (out / "final_samples.png").write_bytes(storage.read_bytes(final["grid"]))
    pics.append(("final_samples.png", f"G_ema after {final['step']} steps (the run's fixed noise)"))
    try:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        req = urllib.request.Request(f"{url}/sample.png?n=64&seed=0", headers=headers)
        context = ssl.create_default_context(cafile=ca_file) if url.startswith("https://") else None
        with urllib.request.urlopen(req, timeout=60, context=context) as r:
            (out / "served.png").write_bytes(r.read())
        pics.append(("served.png", f"fetched from the live endpoint: {url}/sample.png?n=64&seed=0"))
    except OSError as e:
        pics.append(("", f"the endpoint did not answer: {e}"))

    if audit.get("pairs_png") and not privacy and storage.exists(audit["pairs_png"]):  # never for a DP run
        (out / "audit_pairs.png").write_bytes(storage.read_bytes(audit["pairs_png"]))
        pics.append(("audit_pairs.png", "memorization audit: the closest samples, each beside its nearest "
                                        "training image. CONTAINS TRAINING PHOTOS: keep this report private"))
    md_table, html_table = _table(search.get("table", []))
    if "copy_rate" in audit:
        copying = (f"copy rate {audit['copy_rate']:.3f} of {audit['num_samples']} samples (nearer a training image "
                   f"than 1% of held-out images are; ~0.01 means no copying), MiFID {audit['mifid']:.2f}, "
                   f"{audit['features']} features")
    else:
        copying = audit.get("skipped", "not run")
    private = (f"epsilon {privacy['epsilon']:.2f} at delta {privacy['delta']:g} (DP-SGD on D, sigma "
               f"{privacy['noise_multiplier']:.3f}, C {privacy['max_grad_norm']:g}), "
               f"{privacy.get('covers', 'covering this run')}" if privacy
               else "not trained with differential privacy")
    if privacy and privacy.get("search"):
        private += f"; {privacy['search']['statement']}"
    if privacy and audit.get("note"):
        copying += f" ({audit['note']})"
    facts = [
        ("served model", f"{final['checkpoint']} (step {final['step']})"),
        ("standard FID (Inception)", f"{fid['value']:.2f} ({fid['num_samples']} samples vs "
                                     f"{fid.get('reference_images')} test images; see README for the floor)"),
        (f"search best {search['metric']}", f"{search['value']:.3f} (trial {search['trial_id']}, step {search['step']})"),
        ("search compute", f"{search['steps_run']} of {search['steps_full_grid']} trial-steps "
                           f"({1 - search['steps_run'] / search['steps_full_grid']:.0%} saved by ASHA)"),
        ("memorization audit", copying),
        ("privacy", private),
        ("playground", f"{url}/"),
        ("time", ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())),
    ]
    when = time.strftime("%Y-%m-%d %H:%M")
    md = [f"# aigc_ray run report ({when})", ""]
    md += [f"- **{k}**: {v}" for k, v in facts]
    md += ["", "## Search", "", md_table]
    md += [line for src, cap in pics for line in ((f"![{cap}]({src})", f"*{cap}*", "") if src else (cap, ""))]
    (out / "report.md").write_text("\n".join(md))
    body = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in facts)
    figs = "".join(f'<figure><img src="{src}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}</figcaption>'
                   f"</figure>" if src else f"<p>{html.escape(cap)}</p>" for src, cap in pics)
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>aigc_ray run report</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto}"
        "img{image-rendering:pixelated;max-width:100%}table{border-collapse:collapse;font-size:.85em}"
        "td,th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"<h1>aigc_ray run report ({when})</h1><ul>{body}</ul><h2>Search</h2>{html_table}{figs}")
