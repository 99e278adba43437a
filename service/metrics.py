"""Every Prometheus metric the daemon exports, defined once.

The supervisor keeps cumulative totals per stage (the counters of processes that died
are added to those of their replacements, so counters stay monotonic across restarts);
this collector turns a snapshot of them into metric families at every scrape. One
process, one endpoint: no multiprocess mode.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from alexnetd import __version__
from alexnetd.pipeline.jpeg import REASONS
from alexnetd.pipeline.stage import STAGES

__all__ = ["DaemonCollector", "EXPORTED_METRICS", "DALI_METRICS", "STATES"]

STATES = ("starting", "rendezvous", "compiling", "training", "validating", "stopping", "degraded")

EXPORTED_METRICS = (
    "alexnetd_stage_images_total",
    "alexnetd_stage_busy_seconds_total",
    "alexnetd_stage_starved_seconds_total",
    "alexnetd_stage_blocked_seconds_total",
    "alexnetd_stage_processes",
    "alexnetd_stage_restarts_total",
    "alexnetd_ring_slots",
    "alexnetd_ring_slots_in_use",
    "alexnetd_reorder_buffer_batches",
    "alexnetd_loader_inline_jobs_total",
    "alexnetd_train_images_total",
    "alexnetd_train_steps_total",
    "alexnetd_train_epoch",
    "alexnetd_train_loss",
    "alexnetd_train_learning_rate",
    "alexnetd_val_top1_error_ratio",
    "alexnetd_val_top5_error_ratio",
    "alexnetd_skipped_samples_total",
    "alexnetd_checkpoint_write_seconds",
    "alexnetd_checkpoint_last_timestamp_seconds",
    "alexnetd_checkpoint_failures_total",
    "alexnetd_memory_bytes",
    "alexnetd_state",
    "alexnetd_info",
    "alexnetd_remote_augmenter_images_total",
    "alexnetd_remote_augmenter_workers",
    "alexnetd_remote_refused_connections_total",
    "alexnetd_remote_reissued_batches_total",
)
# Only a daemon that decodes with `--decoder dali` exports these (the snapshot's
# "decoder"): which path decoded its images, DALI on the device or the host fallback.
DALI_METRICS = ("alexnetd_decoder_images_total",)


class DaemonCollector(Collector):
    """`snapshot()` returns the supervisor's metrics view:
    {"stages": {stage: {"images", "busy", "starved", "blocked", "processes", "restarts"}},
     "ranks": [{"stages": {stage: {"images", "busy", "starved", "blocked", "processes"}},
                "ring_slots_in_use", "reorder"}, ...] (one per data-parallel rank, in rank order),
     "ring_slots", "ring_slots_in_use", "reorder", "inline_jobs", "train_images", "steps", "epoch", "loss", "lr",
     "val": {...} | None, "skipped": {reason: n}, "checkpoint": {...} | None,
     "memory": {device: bytes}, "state": str, "device": "cpu" | "cuda", "checkpoint_failures": int,
     "remote": {"hosts": [{"host", "workers", ...}], "images": {host: n}, "refused", "reissued"} | None,
     "decoder": {"dali_decoded", "host_fallback", ...} | None (pipeline/decoders.py, DaliDecoding.status)}"""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        # Every rank has its own input side and trainer: these carry a `rank` label
        # (sum by stage for the whole daemon, by rank to find the slow one).
        per_rank_stage = [
            ("alexnetd_stage_images", "Images a stage has finished.", "images", CounterMetricFamily),
            ("alexnetd_stage_busy_seconds", "Seconds a stage spent on its own work.", "busy", CounterMetricFamily),
            ("alexnetd_stage_starved_seconds", "Seconds a stage waited for input or a free slot.", "starved", CounterMetricFamily),
            ("alexnetd_stage_blocked_seconds", "Seconds a stage waited to hand its output on.", "blocked", CounterMetricFamily),
            ("alexnetd_stage_processes", "Processes (or threads) of a stage that are up.", "processes", GaugeMetricFamily),
        ]
        for name, doc, key, family in per_rank_stage:
            metric = family(name, doc, labels=["stage", "rank"])
            for index, view in enumerate(s["ranks"]):
                rank = view.get("rank", index)  # global: unique across the nodes of a group
                for stage in STAGES:
                    metric.add_metric([stage, str(rank)], float(view["stages"][stage][key]))
            yield metric
        # The supervisor restarts a stage's processes (a trainer: every rank's at once).
        restarts = CounterMetricFamily("alexnetd_stage_restarts", "Restarts of a stage's processes.", labels=["stage"])
        for stage in STAGES:
            restarts.add_metric([stage], float(s["stages"][stage]["restarts"]))
        yield restarts

        yield _gauge("alexnetd_ring_slots", "Batch slots in the shared-memory ring (of each rank).", s["ring_slots"])
        in_use = GaugeMetricFamily("alexnetd_ring_slots_in_use", "Slots holding a batch being built or trained on.", labels=["rank"])
        reorder = GaugeMetricFamily("alexnetd_reorder_buffer_batches", "Batches waiting for their turn at the trainer.", labels=["rank"])
        for index, view in enumerate(s["ranks"]):
            rank = view.get("rank", index)
            in_use.add_metric([str(rank)], float(view["ring_slots_in_use"]))
            reorder.add_metric([str(rank)], float(view["reorder"]))
        yield in_use
        yield reorder
        yield CounterMetricFamily("alexnetd_loader_inline_jobs",
                                  "Batches whose JPEG bytes rode the job message instead of the slot's shared "
                                  "memory (over the bound, or /dev/shm full); grows only when shared memory is short.",
                                  value=float(s.get("inline_jobs", 0)))
        yield CounterMetricFamily("alexnetd_train_images", "Images trained on.", value=s["train_images"])
        yield CounterMetricFamily("alexnetd_train_steps", "SGD steps taken.", value=s["steps"])
        yield _gauge("alexnetd_train_epoch", "Current epoch (0-based).", s["epoch"])
        yield _gauge("alexnetd_train_loss", "Training loss of the last logged step.", s["loss"] or 0.0)
        yield _gauge("alexnetd_train_learning_rate", "Current learning rate.", s["lr"] or 0.0)
        val = s["val"] or {}
        # Before the first validation there is no error to report: NaN, not a fake 0.
        yield _gauge("alexnetd_val_top1_error_ratio", "Top-1 validation error of the last validation.", val.get("top1_error", float("nan")))
        yield _gauge("alexnetd_val_top5_error_ratio", "Top-5 validation error of the last validation.", val.get("top5_error", float("nan")))

        skipped = CounterMetricFamily("alexnetd_skipped_samples", "Samples skipped because they would not decode.", labels=["reason"])
        for reason in REASONS:
            skipped.add_metric([reason], float(s["skipped"].get(reason, 0)))
        yield skipped

        checkpoint = s["checkpoint"] or {}
        yield _gauge("alexnetd_checkpoint_write_seconds", "Seconds the last checkpoint took to write.", checkpoint.get("write_seconds", 0.0))
        yield _gauge("alexnetd_checkpoint_last_timestamp_seconds", "Unix time of the last checkpoint (0: none yet).", checkpoint.get("t", 0.0))
        yield CounterMetricFamily("alexnetd_checkpoint_failures", "Checkpoint writes that failed (full disk, I/O error).",
                                  value=float(s.get("checkpoint_failures", 0)))

        memory = GaugeMetricFamily("alexnetd_memory_bytes", "Device memory allocated (CUDA), or the trainer's resident memory (cpu).", labels=["device"])
        for device, used in (s["memory"] or {"cpu": 0}).items():
            memory.add_metric([device], float(used))
        yield memory

        info = GaugeMetricFamily("alexnetd_info", "Always 1; the labels say what this daemon runs on.",
                                 labels=["version", "device"])
        info.add_metric([__version__, s.get("device", "cpu")], 1.0)
        yield info

        state = GaugeMetricFamily("alexnetd_state", "1 for the daemon's current state.", labels=["state"])
        for name in STATES:
            state.add_metric([name], 1.0 if s["state"] == name else 0.0)
        yield state
        yield from _remote(s.get("remote"))
        yield from _decoder(s.get("decoder"))


def _decoder(decoder: dict | None):
    """DALI's images by path: a host count that grows says the device path is not the one running."""
    if not decoder:
        return
    images = CounterMetricFamily("alexnetd_decoder_images",
                                 "Images decoded with --decoder dali: on the device by DALI, or on the host "
                                 "(CMYK, not JPEG, suspect streams, batches DALI failed on).", labels=["path"])
    images.add_metric(["dali"], float(decoder["dali_decoded"]))
    images.add_metric(["host"], float(decoder["host_fallback"]))
    yield images


def _remote(remote: dict | None):
    """Remote augmenter hosts, labelled by the name of the key each authenticated with."""
    remote = remote or {"hosts": [], "images": {}, "refused": 0, "reissued": 0}
    images = CounterMetricFamily("alexnetd_remote_augmenter_images", "Images decoded by a remote augmenter host.",
                                 labels=["host"])
    for host, count in sorted(remote["images"].items()):
        images.add_metric([host], float(count))
    yield images
    workers = GaugeMetricFamily("alexnetd_remote_augmenter_workers", "Connected workers of a remote augmenter host.",
                                labels=["host"])
    per_host: dict = {}
    for row in remote["hosts"]:
        per_host[row["host"]] = per_host.get(row["host"], 0) + row["workers"]
    for host, count in sorted(per_host.items()):
        workers.add_metric([host], float(count))
    yield workers
    yield CounterMetricFamily("alexnetd_remote_refused_connections",
                              "Remote augmenter connections refused (unknown or revoked key, failed handshake).",
                              value=float(remote["refused"]))
    yield CounterMetricFamily("alexnetd_remote_reissued_batches",
                              "Batches taken back from a remote host that died or went silent, and made again.",
                              value=float(remote["reissued"]))


def _gauge(name: str, doc: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))
