"""The run configuration's schema: one frozen dataclass per YAML section, every field documented
where it is declared.

A run's YAML has one mapping per section (`model`, `parallel`, `data`, `optim`, `train`,
`checkpoint`, `logging`, `run`, `rm`, `ppo`, `lora`, `launch`); `config.py` loads it into `Config`
and `config_checks.py` checks it across fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from alfred_train.launch.config import LaunchConfig


@dataclass(frozen=True)
class ModelConfig:
    preset: Optional[str] = None  # name of a file in configs/presets/ whose keys fill this section
    arch: Literal["llama", "falcon"] = "llama"  # llama: RMSNorm+SwiGLU; falcon: parallel attn+MLP, GELU
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None  # None: 4*hidden (falcon) or Llama's 8/3*hidden rounded to 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # key/value heads (GQA); None = one per attention head
    vocab_size: Optional[int] = None  # None: taken from the tokenizer; padded to a multiple of 128
    max_seq_len: int = 128  # longest sequence RoPE and the KV cache are sized for
    rotary_base: int = 10000
    norm_eps: float = 1e-5
    parallel_layernorms: int = 2  # falcon only: 2 = "new decoder architecture" (40B/180B), 1 = 7B
    init_std: float = 0.02  # std of the normal init of new weights (ignored when loading a checkpoint)
    attention_backend: Literal["auto", "te", "flash", "sdpa", "eager"] = "auto"
    tokenizer: Optional[str] = None  # sentencepiece .model, tokenizer.json or a dir; None = tiny shipped one


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel size: splits each layer's matrices over tp ranks
    pp: int = 1  # pipeline-parallel size: splits the layers into pp stages
    dp: int = 1  # data-parallel size: tp*pp*dp must equal the number of processes
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved 1F1B); None = off
    zero: bool = False  # shard optimizer state over DP (megatron-core distributed optimizer, ZeRO-1)
    sequence_parallel: bool = False  # shard activations along the sequence in TP regions (GPU only)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, gloo without


DataFormat = Literal["auto", "records", "hh-rlhf", "oasst1", "dolly", "alpaca", "sharegpt", "stack-exchange-paired"]


@dataclass(frozen=True)
class DataSource:
    """One file of a data mixture (`data.train: [{path: ..., format: ..., weight: ...}, ...]`)."""

    path: str  # .jsonl / .json (one object per line) or .parquet, as the hubs ship them
    format: Optional[DataFormat] = None  # None: data.format
    weight: float = 1.0  # copies of this file per pass: 2 = every record twice, 0.5 = a seeded half


DataFiles = Union[str, tuple[DataSource, ...]]  # one path (the form of data.format), or a mixture


@dataclass(frozen=True)
class DataConfig:
    train: Optional[DataFiles] = None  # file or mixture; None with `synthetic: true` generates the demo task
    valid: Optional[DataFiles] = None  # file or mixture; None = hold out `valid_fraction` of train
    valid_fraction: float = 0.05
    format: DataFormat = "auto"  # auto: told by each file's keys (alfred_train/data/formats.py)
    languages: tuple[str, ...] = ()  # oasst1: keep messages in these languages (Alfred: en fr de es it); () = all
    skip_bad_records: bool = False  # false: a bad record stops the run (file:line, exit 2); true: skip and count
    template: Literal["stackllama", "tulu", "vicuna", "stable-vicuna", "plain"] = "stackllama"
    seq_len: int = 64  # tokens per packed SFT sample / max tokens per RM pair member
    pack: bool = True  # SFT: concatenate examples into seq_len blocks (StackLLaMA); False pads each
    synthetic: bool = False  # generate the built-in synthetic task instead of reading files
    synthetic_size: int = 2000  # number of generated records when synthetic
    prompts: Optional[DataFiles] = None  # PPO prompt set, file or mixture (None: the contexts of data.train)


@dataclass(frozen=True)
class OptimConfig:
    # Schedule unit: optimizer steps for SFT and RM; PPO *iterations* for PPO, for the policy and the
    # value model alike (the value model's 8 steps per iteration share one rate; with ppo.value_lr
    # unset its rate at iteration k equals the policy's), as the Alfred recipe counts them.
    lr: float = 1e-3  # peak learning rate after warm-up
    min_lr: float = 1e-4  # floor reached at the end of the decay
    warmup_steps: int = 10  # steps (SFT/RM) or PPO iterations from 0 to lr
    decay_steps: Optional[int] = None  # steps or PPO iterations from 0 to the floor; None: train.max_steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 20  # optimizer steps (SFT/RM) or PPO iterations (PPO)
    micro_batch_size: int = 4  # samples per forward/backward on one DP rank
    global_batch_size: int = 8  # samples per optimizer step over all DP ranks (grad accumulation)
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    eval_interval: int = 0  # evaluate every N steps (0: only at the end when there is a valid set)
    eval_batches: int = 4  # micro-batches per evaluation
    log_interval: int = 10  # without a terminal, print a progress line every N steps (metrics.jsonl: every step)
    # stop after this many steps (PPO: iterations) in a row whose update was skipped for a non-finite
    # loss or gradient; each skipped one is said on the console
    max_bad_steps: int = 3
    # activation recomputation (megatron-core): none; selective = attention core; full = keep each
    # layer's input only and re-run the layer in the backward pass (~1/3 more compute, least memory)
    recompute: Literal["none", "selective", "full"] = "none"


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 0  # save every N steps (0: only at the end)
    keep: int = 2  # keep the newest N checkpoints by step number (never the one just written), locally and in S3
    # auto: the newest checkpoint under run.dir/checkpoints (or s3_uri) that verifies against its manifest,
    # by step number (`latest` is only a hint); damaged ones are named and skipped; if checkpoints exist
    # but none is sound the run stops (exit 2) instead of starting over. none: start at step 0. Or a path.
    resume: str = "auto"
    init: Optional[str] = None  # checkpoint dir to initialize weights from (SFT/RM/PPO policy)
    save_final: bool = True  # save at the last step
    # s3://bucket/prefix holding iter_N/ folders: each completed checkpoint is uploaded (manifest last,
    # then verified; `keep` applies there too), and resume downloads a newer sound one from it, e.g. into
    # an empty run directory after a spot reclaim. Credentials and endpoint: boto3's usual environment.
    s3_uri: Optional[str] = None
    # run.dir is local to each node (SageMaker's /opt/ml/checkpoints on a multi-instance job): every node's
    # local rank 0 prepares and renames its own copy, which holds its ranks' files and the manifest of all;
    # `latest` moves when every node's part is complete. Resume needs every node's files in each copy
    # (from s3_uri, or SageMaker's checkpoint sync). false: run.dir is one shared directory.
    node_local: bool = False


@dataclass(frozen=True)
class WandbConfig:
    project: str = "alfred-train"
    name: Optional[str] = None  # the W&B run's display name (default: run.name, else the run dir's name)
    entity: Optional[str] = None  # team or user (default: the logged-in user's)
    # offline: files under run.dir/wandb, `wandb sync` later; disabled: no W&B run.
    # None: the environment's WANDB_MODE, else online (set here, it wins over WANDB_MODE, as wandb.init's does)
    mode: Optional[Literal["online", "offline", "disabled"]] = None


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True  # progress bar with ETA on rank 0
    plots: bool = True  # write metrics.png at the end of the run
    wandb: Optional[WandbConfig] = None  # also send metrics.jsonl rows and the config to Weights & Biases
    # profile this step (1-based; PPO: an iteration) with torch.profiler: per phase and rank, a Chrome
    # trace and a table of the top ops under run_dir/profile/ (alfred_train/profiling.py); that step runs slower
    profile_step: Optional[int] = None


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/tiny-sft"  # the run directory (config.yaml, metrics.jsonl, tb/, checkpoints/); unset in a file: runs/<file stem>
    name: Optional[str] = None


@dataclass(frozen=True)
class RMConfig:
    init: Optional[str] = None  # SFT checkpoint to initialize the reward model's trunk from
    margin_loss: bool = False  # reserved: Llama-2 style margin; plain Bradley-Terry when False


@dataclass(frozen=True)
class PPOConfig:
    policy_init: Optional[str] = None  # SFT checkpoint: policy and reference start here
    reward_init: Optional[str] = None  # RM checkpoint: reward model and value model start here
    rollouts_per_iter: int = 16  # rollouts per PPO iteration, counted globally across DP (Alfred: 1024)
    rollout_micro_batch: int = 8  # prompts generated together on one DP rank
    train_micro_batch: int = 4  # samples per forward/backward in the update phase
    policy_epochs: int = 1
    policy_steps_per_epoch: int = 1  # policy optimizer steps (mini-batches) per epoch
    value_epochs: int = 1
    value_steps_per_epoch: int = 8
    kl_coef: float = 0.01  # beta
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0  # adaptive controller target KL
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_policy: float = 0.2
    clip_value: float = 0.2
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    # score_on_eod: the RM reads its score at the response's EOD; a response cut at max_new_tokens
    # without one gets an EOD appended for scoring (the input the RM was trained on). False: the
    # score is read at the last response token, whatever it is.
    score_on_eod: bool = True
    missing_eod_penalty: Optional[float] = None  # subtracted from the score of a response without EOD (TRL's missing_eos_penalty)
    max_new_tokens: int = 16  # continuation max length
    min_new_tokens: int = 0
    # max_prompt_tokens: a longer prompt keeps BOS and its last tokens (the template's answer cue) and
    # is counted in the `prompts_cut` metric. None: model.max_seq_len - max_new_tokens (- 1 for the
    # EOD appended with score_on_eod). prompt + response (+ EOD) must fit model.max_seq_len.
    max_prompt_tokens: Optional[int] = None
    # Sampling. The old/new/reference log-probs of the PPO ratio and KL use logits / temperature, the
    # distribution the rollouts were drawn from (as TRL, OpenRLHF, verl). top_k / top_p truncate the
    # sampler only: the log-probs are of the full tempered softmax, so with them on the sampled
    # tokens' probabilities are slightly understated (the same approximation those trainers make).
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    offload_frozen: bool = False  # keep reference and reward models on CPU between phases
    value_lr: Optional[float] = None  # None: optim.lr
    eval_prompts: int = 32  # held-out prompts scored at the start and end of the run: the first distinct ones
    # of the prompt set (before data.prompts weights), and no training prompt repeats one
    samples_per_iter: int = 4  # prompt/response pairs written to samples.jsonl each iteration
    eval_tasks: tuple[str, ...] = ()  # lm-eval task names or task YAML files run on the final policy
    eval_limit: Optional[int] = None  # at most this many examples per eval task (None: all)
    # true: the scoring pass re-computes the policy's log-probs (and reports the largest difference to
    # the sampler's as logprob_gap); false: PPO uses the sampler's own log-probs, one forward fewer.
    # They agree to rounding: 1e-6 in fp32, at most 0.065 in bf16 on an H100 (a first ratio of 1.07)
    recompute_logprobs: bool = True
    # a rollout row that reaches EOD takes the iteration's next prompt at once (rollout_micro_batch rows
    # decoded together); false: static micro-batches, each held by its longest response. Same tokens.
    continuous_batching: bool = True
    # PP > 1: decode with pp row groups in flight across the stages, every stage busy (continuously
    # batched as well); false: one token through the stages at a time. Same tokens. Off by
    # default: it pays when a stage's step is compute-bound (large models); on the tiny CPU model,
    # overhead-bound, half-size groups cost as much as whole batches (bench_pp_generation.py).
    pipelined_decode: bool = False
    # CPU: the fast decoder's decode step compiled by torch.compile (inductor fuses each layer's small
    # ops: ~40% off a tiny decode step; bench_vs_hf.py). Costs a C++ compiler and ~10-20 s of
    # compilation in the first iteration (a few seconds from inductor's disk cache); a failure to
    # compile warns once and decodes eagerly. Rounding differs from eager in the last bits. Scoring and
    # the updates stay eager (ppo/compiled.py says why). Not used on a GPU, where the decode step is
    # captured in a CUDA graph.
    compile_decode: bool = False


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # megatron's linear layer names


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (models/lora.py) on the policy, reward and value models; the base is frozen."""

    rank: int = 0  # r of each adapter delta = (alpha / r) * B A x; 0 = off (full fine-tuning)
    alpha: float = 16.0  # scale numerator: StackLLaMA uses r = 16, alpha = 32
    dropout: float = 0.05  # dropout on the adapter's input (training only), as PEFT's lora_dropout
    # which linears get an adapter (attention only by default, as StackLLaMA's q_proj/v_proj):
    # linear_qkv (fused q/k/v), linear_proj (attention output), linear_fc1 (MLP up [gate; up]),
    # linear_fc2 (MLP down)
    targets: tuple[str, ...] = ("linear_qkv", "linear_proj")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp * self.parallel.dp
