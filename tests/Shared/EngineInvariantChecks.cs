using System.Runtime.CompilerServices;
using LocalVllm.Engine.Core;

namespace LocalVllm.TestSupport;

/// <summary>
/// Checks the KV pool of every engine a test builds when the engine is disposed: reference counts equal the live
/// sequences' holds (plus pins), every cached block holds the tokens of each sequence that holds it, the free lists
/// add up, and with nothing unfinished every block is free. Compiled into each test assembly and armed by a module
/// initializer, so no test can forget it; a violation throws from the test's own <c>Dispose</c>.
/// </summary>
internal static class EngineInvariantChecks
{
    [ModuleInitializer]
    internal static void Arm() => LlmEngine.DisposingHook = Check;

    /// <summary>How many engines were checked in this process (a test asserts the hook is live).</summary>
    public static int Checked => Volatile.Read(ref _checked);

    private static int _checked;

    private static void Check(LlmEngine engine)
    {
        var live = engine.Scheduler.Unfinished.ToList();
        engine.Blocks.CheckInvariants(live);
        if (live.Count == 0) engine.Blocks.CheckInvariants(expectAllFree: true);
        Interlocked.Increment(ref _checked);
    }
}
