using System.Diagnostics.Metrics;

namespace LocalVllm.Engine;

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
    public long Steps { get; init; }
    public long FinishedRequests { get; init; }
}

/// <summary>The engine's instruments on the <c>LocalVllm</c> meter, so OpenTelemetry sees them with no extra code.</summary>
internal static class EngineMetrics
{
    public static readonly Meter Meter = new("LocalVllm");
    public static readonly Counter<long> PrefillTokens = Meter.CreateCounter<long>("localvllm.prefill_tokens", "{token}", "Prompt tokens computed.");
    public static readonly Counter<long> DecodeTokens = Meter.CreateCounter<long>("localvllm.decode_tokens", "{token}", "Tokens decoded.");
    public static readonly Counter<long> FinishedRequests = Meter.CreateCounter<long>("localvllm.requests_finished", "{request}", "Requests finished.");
    public static readonly Histogram<double> TimeToFirstToken = Meter.CreateHistogram<double>("localvllm.time_to_first_token", "s", "Arrival to first generated token.");

    private static readonly List<WeakReference<LlmEngine>> _engines = [];
    private static volatile EngineStats[] _last = [];

    static EngineMetrics()
    {
        Meter.CreateObservableGauge("localvllm.kv_blocks_used", () => _last.Sum(s => s.KvBlocksUsed), "{block}");
        Meter.CreateObservableGauge("localvllm.kv_blocks_cached", () => _last.Sum(s => s.KvBlocksCached), "{block}");
        Meter.CreateObservableGauge("localvllm.kv_blocks_pinned", () => _last.Sum(s => s.KvBlocksPinned), "{block}");
        Meter.CreateObservableGauge("localvllm.kv_blocks_free", () => _last.Sum(s => s.KvBlocksFree), "{block}");
        Meter.CreateObservableGauge("localvllm.prefix_cache_hit_rate", () => { var l = _last; long p = l.Sum(s => s.PromptTokens); return p == 0 ? 0 : (double)l.Sum(s => s.PrefixCacheHitTokens) / p; });
        Meter.CreateObservableGauge("localvllm.requests_running", () => _last.Sum(s => s.Running), "{request}");
        Meter.CreateObservableGauge("localvllm.requests_waiting", () => _last.Sum(s => s.Waiting), "{request}");
        Meter.CreateObservableCounter("localvllm.prefix_cache_hit_tokens", () => _last.Sum(s => s.PrefixCacheHitTokens), "{token}");
    }

    public static void Register(LlmEngine engine) { lock (_engines) _engines.Add(new(engine)); }

    public static void Unregister(LlmEngine engine)
    {
        lock (_engines) _engines.RemoveAll(w => !w.TryGetTarget(out var e) || e == engine);
    }

    /// <summary>Called by the engine's owner thread after each step so gauges never read live engine state.</summary>
    public static void Publish(LlmEngine engine, EngineStats stats)
    {
        lock (_engines)
        {
            var list = new List<EngineStats>();
            foreach (var w in _engines)
                if (w.TryGetTarget(out var e)) list.Add(e == engine ? stats : e.LastStats ?? new EngineStats());
            _last = [.. list];
        }
    }
}
