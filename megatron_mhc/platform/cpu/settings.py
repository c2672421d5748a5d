"""What a CPU run sets besides the patches: megatron.training flags, or for Megatron-Core alone
the equivalent TransformerConfig fields, and the environment to set before torch is imported."""

__all__ = ["CPU_CONFIG_FIELDS", "CPU_ENV", "CPU_MEGATRON_ARGS"]

# The TransformerConfig fields of CPU_MEGATRON_ARGS, for Megatron-Core used without
# megatron.training: weights initialised on the CPU, the local spec, no fused (CUDA-only) kernels.
CPU_CONFIG_FIELDS = dict(
    use_cpu_initialization=True,
    transformer_impl="local",
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
)

# megatron.training flags that keep a CPU run off CUDA-only code paths.
CPU_MEGATRON_ARGS = [
    "--distributed-backend", "gloo",
    "--use-cpu-initialization",
    "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-masked-softmax-fusion",
    "--no-persist-layer-norm",
    "--no-rope-fusion",
    "--disable-jit-fuser",
]  # fmt: skip

# Environment of a CPU run, to set before torch is imported: TORCHDYNAMO_DISABLE=1 (otherwise
# Megatron's jit_fuser functions go through torch.compile: ~40 s of start-up on 2 cores) and
# CUDA_DEVICE_MAX_CONNECTIONS=1 (validate_args asserts it for TP or CP > 1 on devices older than
# Blackwell, and the CPU reports no GPU architecture).
CPU_ENV = {"TORCHDYNAMO_DISABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
