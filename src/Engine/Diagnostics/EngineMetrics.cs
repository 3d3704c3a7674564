using System.Diagnostics.Metrics;
using LocalVllm.Engine.Core;

namespace LocalVllm.Engine.Diagnostics;

/// <summary>The engine's instruments on the <c>LocalVllm</c> meter, so OpenTelemetry sees them with no extra code.</summary>
internal static class EngineMetrics
{
    public static readonly Meter Meter = new("LocalVllm");
    public static readonly Counter<long> PrefillTokens = Meter.CreateCounter<long>("localvllm.prefill_tokens", "{token}", "Prompt tokens computed.");
    public static readonly Counter<long> DecodeTokens = Meter.CreateCounter<long>("localvllm.decode_tokens", "{token}", "Tokens decoded.");
    public static readonly Counter<long> FinishedRequests = Meter.CreateCounter<long>("localvllm.requests_finished", "{request}", "Requests finished, by finished_reason.");
    // Bucket boundaries as vLLM's histograms of the same quantities, so its dashboards read ours alike.
    public static readonly Histogram<double> TimeToFirstToken = Meter.CreateHistogram("localvllm.time_to_first_token", "s", "Arrival to first generated token.",
        advice: Buckets(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0));
    public static readonly Histogram<double> TimePerOutputToken = Meter.CreateHistogram("localvllm.time_per_output_token", "s", "Time between two generated tokens of a sequence.",
        advice: Buckets(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0));
    public static readonly Histogram<double> E2eLatency = Meter.CreateHistogram("localvllm.e2e_request_latency", "s", "Arrival to the end of a finished request.",
        advice: Buckets(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0));
    public static readonly Histogram<double> QueueTime = Meter.CreateHistogram("localvllm.request_queue_time", "s", "Arrival to first admission of a finished request.",
        advice: Buckets(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0));
    public static readonly Histogram<long> RequestPromptTokens = Meter.CreateHistogram<long>("localvllm.request_prompt_tokens", "{token}", "Prompt tokens of a finished request.",
        advice: new InstrumentAdvice<long> { HistogramBucketBoundaries = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000] });
    public static readonly Histogram<long> RequestGenerationTokens = Meter.CreateHistogram<long>("localvllm.request_generation_tokens", "{token}", "Generated tokens of a finished request (all its completions).",
        advice: new InstrumentAdvice<long> { HistogramBucketBoundaries = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000] });

    private static InstrumentAdvice<double> Buckets(params double[] bounds) => new() { HistogramBucketBoundaries = bounds };

    /// <summary>A finished request's counter (by finish reason, as vLLM's <c>finished_reason</c> label) and histograms.</summary>
    public static void RecordFinished(Request request)
    {
        var first = request.Sequences[0];
        FinishedRequests.Add(1, new KeyValuePair<string, object?>("finished_reason", first.FinishReason));
        long now = System.Diagnostics.Stopwatch.GetTimestamp();
        E2eLatency.Record(System.Diagnostics.Stopwatch.GetElapsedTime(first.ArrivalTicks, now).TotalSeconds);
        if (first.FirstScheduledTicks is long admitted)
            QueueTime.Record(System.Diagnostics.Stopwatch.GetElapsedTime(first.ArrivalTicks, admitted).TotalSeconds);
        RequestPromptTokens.Record(request.PromptIds.Length);
        RequestGenerationTokens.Record(request.Sequences.Sum(s => (long)s.NumOutputTokens));
    }

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
        Meter.CreateObservableCounter("localvllm.prefix_cache_query_tokens", () => _last.Sum(s => s.PromptTokens), "{token}", "Prompt tokens looked up in the prefix cache.");
        Meter.CreateObservableCounter("localvllm.preemptions", () => _last.Sum(s => s.Preemptions), "{preemption}", "Running sequences preempted for lack of KV blocks.");
        Meter.CreateObservableCounter("localvllm.spec_decode_draft_tokens", () => _last.Sum(s => s.SpecDraftTokens), "{token}", "Speculative decoding: draft tokens computed.");
        Meter.CreateObservableCounter("localvllm.spec_decode_accepted_tokens", () => _last.Sum(s => s.SpecAcceptedTokens), "{token}", "Speculative decoding: draft tokens accepted.");
        // vLLM's lora_requests_info: one series per engine with LoRA on, its labels the adapters running and waiting and
        // max_lora, its value the time of the reading (Unix seconds), as vLLM reports it.
        Meter.CreateObservableGauge("localvllm.lora_requests_info", () => _last.Where(s => s.MaxLoras is not null).Select(s => new Measurement<double>(
            DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0,
            new KeyValuePair<string, object?>("max_lora", s.MaxLoras!.Value.ToString(System.Globalization.CultureInfo.InvariantCulture)),
            new KeyValuePair<string, object?>("running_lora_adapters", string.Join(",", s.RunningLoraAdapters)),
            new KeyValuePair<string, object?>("waiting_lora_adapters", string.Join(",", s.WaitingLoraAdapters)))).ToArray(),
            null, "LoRA adapters of running and waiting requests (labels), at the time of reading in Unix seconds (value).");
        Meter.CreateObservableGauge("localvllm.kv_cache_usage", () =>
        {
            var l = _last;
            long total = l.Sum(s => (long)s.KvBlocksTotal);
            return total == 0 ? 0 : (double)l.Sum(s => (long)s.KvBlocksUsed) / total;
        }, description: "Fraction of KV blocks held by running sequences (0 to 1).");
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
