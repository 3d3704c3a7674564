namespace LocalVllm.Engine.Diagnostics;

/// <summary>A snapshot of the engine: queues, KV blocks, and cumulative token counts.</summary>
public sealed record EngineStats
{
    public int Running { get; init; }
    public int Waiting { get; init; }
    public int KvBlocksTotal { get; init; }
    /// <summary>Blocks owned by running sequences.</summary>
    public int KvBlocksUsed { get; init; }
    /// <summary>Blocks holding nothing reusable.</summary>
    public int KvBlocksFree { get; init; }
    /// <summary>Blocks with reference count zero that still hold a cached prefix.</summary>
    public int KvBlocksCached { get; init; }
    /// <summary>Blocks held by pinned prefixes (they count as used).</summary>
    public int KvBlocksPinned { get; init; }
    /// <summary>Cached blocks evicted to make room.</summary>
    public long Evictions { get; init; }
    /// <summary>Times a request waited a step for another to compute the head they share.</summary>
    public long DeferredForSharedPrefix { get; init; }
    /// <summary>Prompt tokens of admitted requests.</summary>
    public long PromptTokens { get; init; }
    /// <summary>Prompt tokens served from the prefix cache (prefill tokens saved).</summary>
    public long PrefixCacheHitTokens { get; init; }
    /// <summary>Prefill tokens the prefix cache saved (same as <see cref="PrefixCacheHitTokens"/>).</summary>
    public long PrefillTokensSaved => PrefixCacheHitTokens;
    /// <summary>Prefix cache hit rate over admitted prompt tokens.</summary>
    public double PrefixCacheHitRate => PromptTokens == 0 ? 0 : (double)PrefixCacheHitTokens / PromptTokens;
    public long PrefillTokens { get; init; }
    public long DecodeTokens { get; init; }
    public long Preemptions { get; init; }
    /// <summary>Speculative decoding: draft tokens computed, and those accepted (the model's greedy choice agreed).</summary>
    public long SpecDraftTokens { get; init; }
    public long SpecAcceptedTokens { get; init; }
    public long Steps { get; init; }
    /// <summary>LoRA: the most adapters per batch (null when LoRA is off), and the adapters of running and of waiting requests, by name.</summary>
    public int? MaxLoras { get; init; }
    public IReadOnlyList<string> RunningLoraAdapters { get; init; } = [];
    public IReadOnlyList<string> WaitingLoraAdapters { get; init; } = [];
    public long FinishedRequests { get; init; }
}
