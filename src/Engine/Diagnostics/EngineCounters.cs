using System.Diagnostics;

namespace LocalVllm.Engine.Diagnostics;

/// <summary>Cumulative engine counters.</summary>
public sealed class EngineCounters
{
    /// <summary>Time spent scheduling (Stopwatch ticks).</summary>
    public long ScheduleTicks { get; internal set; }
    /// <summary>Time spent building the step's tensors and running the model (Stopwatch ticks); see <see cref="InputTicks"/>.</summary>
    public long ForwardTicks { get; internal set; }
    /// <summary>Part of <see cref="ForwardTicks"/> spent building the step's input tensors on the host.</summary>
    public long InputTicks { get; internal set; }
    /// <summary>Time spent sampling (Stopwatch ticks).</summary>
    public long SampleTicks { get; internal set; }
    /// <summary>Time spent post-processing: appending tokens, stop checks, detokenizing, building outputs (Stopwatch ticks).</summary>
    public long OutputTicks { get; internal set; }

    /// <summary>A one-line split of where step time went, in total or since an earlier <see cref="Snapshot"/>.</summary>
    public string TimeSplit(EngineCounters? since = null)
    {
        var b = since ?? new EngineCounters();
        double Ms(long ticks) => ticks * 1000.0 / Stopwatch.Frequency;
        long schedule = ScheduleTicks - b.ScheduleTicks, forward = ForwardTicks - b.ForwardTicks, inputs = InputTicks - b.InputTicks;
        long sample = SampleTicks - b.SampleTicks, output = OutputTicks - b.OutputTicks, steps = Steps - b.Steps;
        double total = Ms(schedule + forward + sample + output);
        return $"steps {steps}: schedule {Ms(schedule):F0} ms, inputs {Ms(inputs):F0} ms, forward {Ms(forward - inputs):F0} ms, " +
               $"sampling {Ms(sample):F0} ms, output {Ms(output):F0} ms (total {total:F0} ms, {total / Math.Max(1, steps):F1} ms/step)";
    }

    /// <summary>A copy of the counters now (to measure a stretch of work with <see cref="TimeSplit"/>).</summary>
    public EngineCounters Snapshot() => (EngineCounters)MemberwiseClone();

    public long Steps { get; internal set; }
    public long PrefillTokens { get; internal set; }
    public long DecodeTokens { get; internal set; }
    public long FinishedRequests { get; internal set; }
    /// <summary>Output tokens appended by structured-output jump-forward instead of being sampled a step each.</summary>
    public long JumpForwardTokens { get; internal set; }
}
