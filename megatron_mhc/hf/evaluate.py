"""An exported model's loss on Megatron's validation split (`tools/evaluate_hf.py`).

The samples come from Megatron's own dataset index, built by the training entry point's dataset
provider with the run's arguments (which the exporter keeps in `megatron_args.json`): the same
split, documents, sequence length and sample order. By default the samples are those Megatron's
evaluation at the checkpoint's iteration read (its validation iterator moves on by
`eval_iters * global_batch_size` samples at every evaluation), and the loss is Megatron's: the
masked per-token cross entropy summed over all those samples, divided by their token count.
"""

import dataclasses
import json
import math
import tempfile
from argparse import Namespace
from pathlib import Path

import torch

RUN_ARGUMENTS = "megatron_args.json"


def run_arguments_json(args: Namespace) -> str:
    """The run's arguments that JSON holds (numbers, strings, lists of them; dtypes by name)."""

    def plain(value):
        if isinstance(value, torch.dtype):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value] if all(map(_is_plain, value)) else None
        return value if _is_plain(value) else None

    return json.dumps({key: plain(value) for key, value in sorted(vars(args).items())}, indent=1)


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


@dataclasses.dataclass
class ValidationLoss:
    loss: float
    tokens: int
    first_sample: int
    num_samples: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def _evaluated_window(args: Namespace) -> tuple:
    """(first sample, samples) Megatron's evaluation at the checkpoint's iteration read; the
    first evaluation's window when there was none at that iteration."""
    samples = args.eval_iters * args.global_batch_size
    evaluations = args.iteration // args.eval_interval if args.eval_interval else 0
    if evaluations and args.iteration % args.eval_interval == 0:
        return (evaluations - 1) * samples, samples
    return 0, samples


def _validation_dataset(args: Namespace):
    """Megatron's validation dataset of the run, built as pretrain_gpt_mhc.py builds it (one
    process: the dataset provider builds where pipeline stages read data)."""
    from megatron.training.global_vars import rebuild_tokenizer, set_args
    from megatron.training.training import get_train_valid_test_num_samples

    from megatron_mhc.training.gpt_step import train_valid_test_datasets_provider

    set_args(args)
    rebuild_tokenizer(args)  # the run's tokenizer: the dataset takes its EOD and pad ids
    _, valid, _ = train_valid_test_datasets_provider(get_train_valid_test_num_samples())
    return valid


def _one_process_model_parallel(scratch: Path) -> None:
    """A one-process gloo group and Megatron's parallel state (TP = PP = 1), which the dataset
    provider consults."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        init_method = f"file://{scratch / 'process_group'}"
        dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def validation_loss(
    model_dir: Path,
    data_path: str | None = None,
    first_sample: int | None = None,
    num_samples: int | None = None,
) -> ValidationLoss:
    """The model's loss on Megatron's validation samples of its run (`data_path`: another
    dataset prefix; `first_sample`, `num_samples`: another window)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    args = Namespace(**json.loads((model_dir / RUN_ARGUMENTS).read_text()))
    args.params_dtype = getattr(torch, args.params_dtype.removeprefix("torch."))
    if data_path is not None:
        args.data_path, args.default_corpus = [data_path], False
    elif args.default_corpus:
        args.data_path = None  # the provider prepares the embedded corpus on this machine
    if args.tokenizer_type == "HuggingFaceTokenizer":
        args.tokenizer_model = str(model_dir)  # the exported copy
    window = _evaluated_window(args)
    first_sample = window[0] if first_sample is None else first_sample
    num_samples = window[1] if num_samples is None else num_samples
    with tempfile.TemporaryDirectory() as scratch:
        _one_process_model_parallel(Path(scratch))
        dataset = _validation_dataset(args)
    if first_sample + num_samples > len(dataset):
        raise ValueError(
            f"samples {first_sample}..{first_sample + num_samples - 1}: the validation split "
            f"holds {len(dataset)}"
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for index in range(first_sample, first_sample + num_samples):
            sample = dataset[index]
            logits = model(sample["tokens"][None], use_cache=False).logits[0].float()
            losses = torch.nn.functional.cross_entropy(logits, sample["labels"], reduction="none")
            mask = sample["loss_mask"].float()
            total += (losses * mask).sum().double()
            tokens += int(mask.sum())
    return ValidationLoss((total / tokens).item(), tokens, first_sample, num_samples)
