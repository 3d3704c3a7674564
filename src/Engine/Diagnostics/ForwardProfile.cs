using System.Diagnostics;

namespace LocalVllm.Engine.Diagnostics;

/// <summary>
/// Opt-in timing of the parts of a forward pass (linear layers, attention, LM head, everything else), for profiling
/// from the benchmarks. Off by default; when off, a timing point costs one branch.
/// </summary>
internal static class ForwardProfile
{
    public enum Part { Linear, Attention, LmHead, Other }

    private static readonly long[] Ticks = new long[8];
    private static int _offset;
    private static long _steps, _bigSteps;

    public static bool Enabled { get; set; }

    public static long Now() => Enabled ? Stopwatch.GetTimestamp() : 0;

    /// <summary>Adds the time since <paramref name="start"/> to <paramref name="part"/> and returns now.</summary>
    public static long Add(Part part, long start)
    {
        if (!Enabled) return 0;
        long now = Stopwatch.GetTimestamp();
        Ticks[_offset + (int)part] += now - start;
        return now;
    }

    /// <summary>Starts a forward pass of <paramref name="tokens"/> tokens: passes of more than 64 are counted apart.</summary>
    public static void BeginPass(int tokens)
    {
        if (!Enabled) return;
        _offset = tokens > 64 ? 4 : 0;
        if (tokens > 64) _bigSteps++; else _steps++;
    }

    public static void Reset()
    {
        Array.Clear(Ticks);
        _steps = _bigSteps = 0;
    }

    public static string Summary()
    {
        static double Ms(long t) => t * 1000.0 / Stopwatch.Frequency;
        string Split(int o, long n) => $"{n} passes: linear {Ms(Ticks[o]):F0} ms, attention {Ms(Ticks[o + 1]):F0} ms, lm head {Ms(Ticks[o + 2]):F0} ms, other ops {Ms(Ticks[o + 3]):F0} ms";
        return $"passes of up to 64 tokens: {Split(0, _steps)}; larger passes: {Split(4, _bigSteps)}";
    }
}
