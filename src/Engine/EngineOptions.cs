using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Loading.Hub;

namespace LocalVllm.Engine;

/// <summary>Engine settings, named as in vLLM. Validated when the engine starts.</summary>
public sealed class EngineOptions
{
    /// <summary>A Hugging Face model directory, or a hub repository id (<c>owner/name</c>, optionally <c>@revision</c>) found in or downloaded into the Hugging Face cache.</summary>
    public string Model { get; set; } = "";
    /// <summary>Hub and cache settings for repository ids; null reads them from the environment (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE).</summary>
    public HubOptions? Hub { get; set; }
    /// <summary>"cpu" (default) or "cuda" (needs the CUDA build of TorchSharp).</summary>
    public string Device { get; set; } = "cpu";
    /// <summary>Compute dtype: "float32" (default), "bfloat16" or "float16".</summary>
    public string DType { get; set; } = "float32";
    /// <summary>
    /// How the matrices (projections, embedding, LM head) are kept in memory when the engine computes in float32 on
    /// the CPU: "auto" (default) keeps a bfloat16 checkpoint's matrices in bfloat16 (half the memory and half the bytes
    /// streamed per decoded token; the kernels widen them exactly and accumulate in float32, so results equal the
    /// float32 path's up to the order of additions) and expands anything else to float32; "float32" expands everything;
    /// "bfloat16" rounds float32/float16 checkpoints to bfloat16 too. Other dtypes and devices keep the weights in the
    /// compute dtype, whatever this says.
    /// </summary>
    public string WeightDType { get; set; } = "auto";
    /// <summary>
    /// Weight quantization at load, as vLLM's <c>--quantization</c>: null (none) or "int8": the matrices (projections,
    /// embedding, LM head) of a float32/bfloat16/float16 checkpoint quantized symmetrically with one scale per group
    /// of 32 weights (llama.cpp's Q8_0 layout); activations stay float32. Needs float32 compute on the CPU with the C#
    /// kernels.
    /// </summary>
    public string? Quantization { get; set; }
    /// <summary>
    /// Structured-output jump-forward: where the constraint allows exactly one continuation (the rest of a key name,
    /// <c>": "</c>, closing brackets), append the tokenizer's canonical tokens for it without sampling a step each
    /// (SGLang's technique). On by default; off, every token is sampled under the mask. Not applied to requests that
    /// ask for log-probabilities.
    /// </summary>
    public bool EnableJumpForward { get; set; } = true;
    /// <summary>Tokens per KV block.</summary>
    public int BlockSize { get; set; } = 16;
    /// <summary>
    /// Bytes of KV cache to allocate. When null: on the CPU, half the memory available after the weights are loaded,
    /// capped at 4 GiB (vLLM's CPU default) and at least 64 MiB; on other devices 256 MiB. The engine logs the result
    /// at start-up ("KV cache: N blocks = T tokens, X GiB"). If the cache cannot hold one sequence of the model's full
    /// context, <see cref="MaxModelLen"/> is lowered to what fits (with a warning), or, when MaxModelLen was set,
    /// start-up fails saying what to change.
    /// </summary>
    public long? KvCacheMemoryBytes { get; set; }
    /// <summary>Number of KV blocks; overrides <see cref="KvCacheMemoryBytes"/> when set (and capacity messages then name it).</summary>
    public int? NumKvBlocks { get; set; }
    /// <summary>Token budget per engine step (prefill chunks and decodes together).</summary>
    public int MaxNumBatchedTokens { get; set; } = 2048;
    /// <summary>Sequences that may run at once.</summary>
    public int MaxNumSeqs { get; set; } = 128;
    /// <summary>Context length cap; defaults to the model's max_position_embeddings.</summary>
    public int? MaxModelLen { get; set; }
    /// <summary>Reuse KV blocks of identical prompt prefixes.</summary>
    public bool EnablePrefixCaching { get; set; } = true;
    /// <summary>Requests arriving together with the same uncached head compute it once (the others wait a step for its blocks).</summary>
    public bool DeduplicateSharedPrefixes { get; set; } = true;
    /// <summary>Admit waiting requests with longer cached prefixes first, with a bounded wait for the others.</summary>
    public bool CacheAwareScheduling { get; set; } = true;
    /// <summary>Evict blocks that only one request used before blocks that several shared (system prompts, tool lists).</summary>
    public bool SharedAwareEviction { get; set; } = true;
    /// <summary>Text prefixes (tokenized with the model's tokenizer) computed at start-up and never evicted.</summary>
    public IReadOnlyList<string> PinnedPrefixes { get; set; } = [];
    /// <summary>Token-id prefixes computed at start-up and never evicted.</summary>
    public IReadOnlyList<IReadOnlyList<int>> PinnedPrefixTokenIds { get; set; } = [];

    /// <summary>Plain vLLM-style automatic prefix caching: LRU eviction, no shared-head dedup, no cache-aware ordering.</summary>
    public void UsePlainPrefixCaching()
    {
        DeduplicateSharedPrefixes = false;
        CacheAwareScheduling = false;
        SharedAwareEviction = false;
    }

    /// <summary>Requests that may wait for admission; beyond it new requests are rejected at once with <see cref="EngineOverloadedException"/>.</summary>
    public int MaxWaitingRequests { get; set; } = 4096;
    /// <summary>The paged-attention implementation; null picks <see cref="TorchPagedAttention"/>.</summary>
    public IAttentionBackend? AttentionBackend { get; set; }

    /// <summary>
    /// Whether the forward pass may use the engine's C# CPU kernels (SmallBatchLinear, CpuLayerOps) where they apply
    /// (float32 on the CPU). Off, every op goes through libtorch as on other devices and dtypes: tests use it to check
    /// that path against the same references.
    /// </summary>
    internal bool CpuKernels { get; set; } = true;

    /// <summary>Show a progress bar on an interactive terminal during <see cref="Llm.Generate(IReadOnlyList{IReadOnlyList{int}}, SamplingParams?, LoraRequest?)"/>.</summary>
    public bool UseProgressBar { get; set; }
    /// <summary>
    /// A chat template to use instead of the model's own (vLLM's <c>--chat-template</c>): the path of a Jinja file, or
    /// the template itself. A base model without a template of its own can then serve chat; the special tokens
    /// (bos_token, eos_token) still come from the model's tokenizer_config.json. Null keeps the model's template.
    /// </summary>
    public string? ChatTemplate { get; set; }

    /// <summary>
    /// The most log-probabilities per position a request may ask for (<see cref="SamplingParams.Logprobs"/>,
    /// <see cref="SamplingParams.PromptLogprobs"/>): 20, as vLLM's <c>max_logprobs</c>; -1 allows up to the vocabulary.
    /// </summary>
    public int MaxLogprobs { get; set; } = 20;

    /// <summary>Serve LoRA adapters (<see cref="LoraRequest"/>), as vLLM's <c>enable_lora</c>.</summary>
    public bool EnableLora { get; set; }

    /// <summary>The most distinct LoRA adapters in one batch (vLLM's <c>max_loras</c>, 1 by default); others wait.</summary>
    public int MaxLoras { get; set; } = 1;

    /// <summary>The highest adapter rank served (vLLM's <c>max_lora_rank</c>, 16 by default).</summary>
    public int MaxLoraRank { get; set; } = 16;

    /// <summary>
    /// Adapters kept loaded (vLLM's <c>max_cpu_loras</c>); null: <see cref="MaxLoras"/>. Past it, the adapter used
    /// least recently by no live request is dropped (and read again from its folder when asked for).
    /// </summary>
    public int? MaxCpuLoras { get; set; }

    /// <summary>libtorch intra-op threads; null keeps libtorch's default.</summary>
    public int? NumThreads { get; set; }

    /// <summary>
    /// Tokens a streaming request gathers before its next output (vLLM's <c>stream_interval</c>): 1 (the default) hands
    /// out every step's token at once; a larger value sends fewer, larger outputs, which saves the consumer's work per
    /// output (a server's event and socket write per token) when steps are fast. A request's first token and its finish
    /// always go out in the step that produced them, so the time to first token does not change.
    /// </summary>
    public int StreamInterval { get; set; } = 1;

    /// <summary>
    /// Where requests' sampling defaults come from (vLLM's <c>--generation-config</c>): <c>"auto"</c> (the default) reads
    /// the model's generation_config.json; <c>"vllm"</c> uses none (temperature 1, no top-p or top-k cut, no repetition
    /// penalty); anything else is a folder whose generation_config.json gives them. The EOS ids always come from the
    /// model. The defaults fill what a request leaves unset (chat options, the server's fields, and
    /// <see cref="Core.LlmEngine.DefaultSamplingParams"/> for <c>Llm.Generate</c> without sampling parameters).
    /// </summary>
    public string GenerationConfig { get; set; } = "auto";

    /// <summary>
    /// Sampling defaults laid over those of <see cref="GenerationConfig"/> (vLLM's <c>--override-generation-config</c>):
    /// <c>temperature</c>, <c>top_p</c>, <c>top_k</c>, <c>min_p</c>, <c>repetition_penalty</c>, <c>max_new_tokens</c>.
    /// Setting temperature, top_p, top_k or min_p makes the defaults sampled (generation_config's <c>do_sample</c>).
    /// </summary>
    public IReadOnlyDictionary<string, double>? OverrideGenerationConfig { get; set; }

    /// <summary>
    /// How waiting requests are ordered and which running one is preempted when blocks run out (vLLM's
    /// <c>--scheduling-policy</c>): <c>"fcfs"</c> (the default: arrival order; the latest admitted is preempted) or
    /// <c>"priority"</c> (by <see cref="SamplingParams.Priority"/>, lower first, then arrival; the lowest-priority, latest
    /// running request is preempted).
    /// </summary>
    public string SchedulingPolicy { get; set; } = "fcfs";

    /// <summary>
    /// The engine's seed (vLLM's <c>--seed</c>): requests without a seed of their own get their random streams from it,
    /// in the order they arrive, so the same requests sent in the same order sample the same tokens from one run of the
    /// engine to the next (what else shares a step can still change them; a request's own seed is exact). Null (the
    /// default): each is seeded at random.
    /// </summary>
    public int? Seed { get; set; }

    /// <summary>
    /// Speculative decoding by prompt lookup (vLLM's <c>--speculative-config '{"method": "ngram", ...}'</c>), or null (the
    /// default) for none. Greedy output is the same either way; see <see cref="Engine.SpeculativeConfig"/>.
    /// </summary>
    public SpeculativeConfig? Speculative { get; set; }

    /// <summary>A copy of these options (lists and the hub settings are shared, not copied).</summary>
    public EngineOptions Clone() => (EngineOptions)MemberwiseClone();

    internal void Validate()
    {
        if (string.IsNullOrWhiteSpace(Model)) throw new ArgumentException("EngineOptions.Model must name a model directory.", nameof(Model));
        if (BlockSize < 1) throw new ArgumentOutOfRangeException(nameof(BlockSize), BlockSize, "BlockSize must be at least 1.");
        if (MaxNumBatchedTokens < 1) throw new ArgumentOutOfRangeException(nameof(MaxNumBatchedTokens), MaxNumBatchedTokens, "MaxNumBatchedTokens must be at least 1.");
        if (MaxNumSeqs < 1) throw new ArgumentOutOfRangeException(nameof(MaxNumSeqs), MaxNumSeqs, "MaxNumSeqs must be at least 1.");
        if (KvCacheMemoryBytes is <= 0) throw new ArgumentOutOfRangeException(nameof(KvCacheMemoryBytes), KvCacheMemoryBytes, "KvCacheMemoryBytes must be positive.");
        if (NumKvBlocks is < 1) throw new ArgumentOutOfRangeException(nameof(NumKvBlocks), NumKvBlocks, "NumKvBlocks must be at least 1.");
        if (MaxWaitingRequests < 0) throw new ArgumentOutOfRangeException(nameof(MaxWaitingRequests), MaxWaitingRequests, "MaxWaitingRequests must be >= 0.");
        if (ChatTemplate is not null) Text.Templating.ChatTemplate.ReplacementSource(ChatTemplate); // a missing file fails here, by name
        if (MaxLoras < 1) throw new ArgumentOutOfRangeException(nameof(MaxLoras), MaxLoras, "MaxLoras must be at least 1.");
        if (MaxLoraRank < 1) throw new ArgumentOutOfRangeException(nameof(MaxLoraRank), MaxLoraRank, "MaxLoraRank must be at least 1.");
        if (MaxCpuLoras is int cpuLoras && cpuLoras < MaxLoras)
            throw new ArgumentOutOfRangeException(nameof(MaxCpuLoras), cpuLoras, $"MaxCpuLoras must be at least MaxLoras ({MaxLoras}).");
        if (MaxLogprobs < -1) throw new ArgumentOutOfRangeException(nameof(MaxLogprobs), MaxLogprobs, "MaxLogprobs must be -1 (no cap) or at least 0.");
        if (string.IsNullOrWhiteSpace(GenerationConfig))
            throw new ArgumentException("GenerationConfig must be \"auto\", \"vllm\" or a folder holding generation_config.json.", nameof(GenerationConfig));
        if (GenerationConfig is not ("auto" or "vllm") && !File.Exists(System.IO.Path.Combine(GenerationConfig, "generation_config.json")))
            throw new ArgumentException($"GenerationConfig '{GenerationConfig}' is neither \"auto\", \"vllm\" nor a folder holding generation_config.json.", nameof(GenerationConfig));
        if (OverrideGenerationConfig is not null) Models.GenerationConfig.CheckOverrides(OverrideGenerationConfig);
        if (SchedulingPolicy is not ("fcfs" or "priority"))
            throw new ArgumentException($"Unknown scheduling policy '{SchedulingPolicy}'; use \"fcfs\" or \"priority\".", nameof(SchedulingPolicy));
        Speculative?.Validate();
        if (StreamInterval < 1) throw new ArgumentOutOfRangeException(nameof(StreamInterval), StreamInterval, "StreamInterval must be at least 1.");
        if (MaxModelLen is < 1) throw new ArgumentOutOfRangeException(nameof(MaxModelLen), MaxModelLen, "MaxModelLen must be at least 1.");
        if (Device is not ("cpu" or "cuda") && !Device.StartsWith("cuda:", StringComparison.Ordinal))
            throw new ArgumentException($"Unknown device '{Device}'; use 'cpu' or 'cuda'.", nameof(Device));
        if (DType is not ("float32" or "bfloat16" or "float16"))
            throw new ArgumentException($"Unknown dtype '{DType}'; use 'float32', 'bfloat16' or 'float16'.", nameof(DType));
        if (Quantization is not (null or "int8"))
            throw new ArgumentException($"Unknown quantization '{Quantization}'; use \"int8\" or none.", nameof(Quantization));
        if (Quantization is not null && (DType != "float32" || Device != "cpu" || !CpuKernels))
            throw new ArgumentException($"Quantization '{Quantization}' runs on the CPU kernels in float32; it cannot be combined with dtype '{DType}' on device '{Device}'.", nameof(Quantization));
        if (WeightDType is not ("auto" or "float32" or "bfloat16"))
            throw new ArgumentException($"Unknown weight dtype '{WeightDType}'; use 'auto', 'float32' or 'bfloat16'.", nameof(WeightDType));
    }
}
