"""Per-log-interval figures of pretrain_gpt_mhc.py beyond Megatron's own log line.

Megatron's training log prints loss, learning rate and grad norm (and writes them to
TensorBoard). Every `--log-interval` iterations this adds a `[mhc]` line with the iteration's
loss printed exactly, and, on stdout and in TensorBoard, the token throughput and the mHC health
figures (mean H_pre, mean H_post, forward and backward Amax gain; per layer and for the whole
stack; in TensorBoard also the token-averaged H_res matrices), measured on the first micro-batch
of the logged iteration. TensorBoard also gets the tokens consumed (`train/tokens`) and the cost
of the figures (`throughput/health_figures_ms`, and its share of the interval's wall time).
After the first iteration it also says which schedule the run took (schedule_report.py).
megatron.training has no per-iteration hook, so `install` wraps its `training_log` (called on
every rank after every iteration).
"""

import functools
import time

from megatron.core import parallel_state
from megatron.training import get_args, get_tensorboard_writer
from megatron.training.utils import print_rank_last

from megatron_mhc.diagnostics import MHCHealthMonitor
from megatron_mhc.megatron_patches import MegatronPatch
from megatron_mhc.training.schedule_report import schedule_plans


class TrainingHealthLog:
    """The run's MHCHealthMonitor and throughput clock."""

    def __init__(self):
        self.monitor = MHCHealthMonitor()
        self._clock = None  # (time, iteration) at the previous log

    def watch(self, model) -> None:
        self.monitor.watch(model)

    def start_if_logging(self) -> None:
        """Called by each forward step: start recording on the first one of a logged iteration."""
        args = get_args()
        if not self.monitor.is_recording and (args.curr_iteration + 1) % args.log_interval == 0:
            self.monitor.start()

    def log(self, iteration: int, loss_dict) -> None:
        args = get_args()
        now = time.perf_counter()
        tokens_per_s = interval_seconds = None
        if self._clock is not None and iteration > self._clock[1]:
            interval_seconds = now - self._clock[0]
            tokens = (iteration - self._clock[1]) * args.global_batch_size * args.seq_length
            tokens_per_s = tokens / interval_seconds
        self._clock = (now, iteration)
        began = time.perf_counter()
        figures = self.monitor.summarize(parallel_state.get_pipeline_model_parallel_group())
        self.monitor.stop()
        line = f" [mhc] iteration {iteration:8d} |"
        for key, value in loss_dict.items():  # this iteration's loss, exactly (repr round-trips)
            line += f" {key}: {float(value)!r} |"
        if tokens_per_s is not None:
            line += f" tokens/s: {tokens_per_s:.1f} |"
        if "mhc/h_pre_mean" in figures:
            line += (
                f" H_pre mean: {figures['mhc/h_pre_mean']:.4f} |"
                f" H_post mean: {figures['mhc/h_post_mean']:.4f} |"
                f" Amax gain fwd: {figures['mhc/amax_gain_fwd']:.4f} |"
                f" bwd: {figures['mhc/amax_gain_bwd']:.4f} |"
            )
            layers = sorted({key.split("/")[1] for key in figures if key.startswith("mhc/layer")})
            for layer in layers:
                line += (
                    f"\n [mhc]   {layer}: H_pre {figures[f'mhc/{layer}/h_pre_mean']:.4f}"
                    f" H_post {figures[f'mhc/{layer}/h_post_mean']:.4f}"
                    f" gain fwd {figures[f'mhc/{layer}/amax_gain_fwd']:.4f}"
                    f" bwd {figures[f'mhc/{layer}/amax_gain_bwd']:.4f}"
                )
        print_rank_last(line)
        writer = get_tensorboard_writer()
        if writer is not None:
            writer.add_scalar(
                "train/tokens", args.consumed_train_samples * args.seq_length, iteration
            )
            if tokens_per_s is not None:
                writer.add_scalar("throughput/tokens_per_s", tokens_per_s, iteration)
            for key, value in figures.items():
                writer.add_scalar(key, value, iteration)
            if figures:
                # What the figures cost this rank once per log interval: recording them in the
                # forward pass, summarizing (the pipeline gather included), printing and writing.
                seconds = self.monitor.seconds + time.perf_counter() - began
                writer.add_scalar("throughput/health_figures_ms", 1e3 * seconds, iteration)
                if interval_seconds is not None:
                    writer.add_scalar(
                        "throughput/health_figures_share", seconds / interval_seconds, iteration
                    )


health_log = TrainingHealthLog()


# megatron.training has no per-iteration hook: `install` wraps `training_log`, which the training
# loop calls on every rank after every iteration.
TRAINING_LOG_PATCH = MegatronPatch(
    "mHC figures in the training log",
    "megatron.training.training",
    "training_log",
    ("loss_dict", "iteration"),
)


def install() -> None:
    """Make megatron.training's `training_log` also call `health_log.log` at log intervals, and
    report the schedule taken after the first iteration."""

    def also_log_health(training_log):
        @functools.wraps(training_log)
        def training_log_with_health(*args, **kwargs):
            result = training_log(*args, **kwargs)
            schedule_plans.report_once()
            arguments = MegatronPatch.bind(training_log, args, kwargs)
            if arguments["iteration"] % get_args().log_interval == 0:
                health_log.log(arguments["iteration"], arguments["loss_dict"])
            return result

        return training_log_with_health

    TRAINING_LOG_PATCH.wrap(also_log_health)
