using System.Diagnostics.Metrics;
using LocalVllm.Engine.Core;

namespace LocalVllm.Engine.Diagnostics;

/// <summary>The engine's instruments on the <c>LocalVllm</c> meter, so OpenTelemetry sees them with no extra code.</summary>
internal static class EngineMetrics
{
    public static readonly Meter Meter = new("LocalVllm");
    public static readonly Counter<long> PrefillTokens = Meter.CreateCounter<long>("localvllm.prefill_tokens", "{token}", "Prompt tokens computed.");
    public static readonly Counter<long> DecodeTokens = Meter.CreateCounter<long>("localvllm.decode_tokens", "{token}", "Tokens decoded.");
    public static readonly Counter<long> FinishedRequests = Meter.CreateCounter<long>("localvllm.requests_finished", "{request}", "Requests finished.");
    public static readonly Histogram<double> TimeToFirstToken = Meter.CreateHistogram<double>("localvllm.time_to_first_token", "s", "Arrival to first generated token.");
    public static readonly Histogram<double> TimePerOutputToken = Meter.CreateHistogram<double>("localvllm.time_per_output_token", "s", "Time between two generated tokens of a sequence.");

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
