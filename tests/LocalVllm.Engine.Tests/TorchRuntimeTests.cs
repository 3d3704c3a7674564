using System.Runtime.InteropServices;
using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>The process settings the engine applies: large tensors come from the reusable heap, not fresh mmaps.</summary>
[Trait("Category", "Kernels")]
public sealed partial class TorchRuntimeTests
{
    [SkippableFact]
    public void Large_tensors_are_not_served_by_fresh_mmaps_after_configure()
    {
        Skip.IfNot(OperatingSystem.IsLinux(), "the malloc tuning is glibc's (Linux only)");
        Skip.If(Environment.GetEnvironmentVariable("LOCALVLLM_MALLOC_TUNING") == "0", "LOCALVLLM_MALLOC_TUNING=0 turns the tuning off");
        TorchRuntime.Configure();
        MallInfo2 before = default;
        try { before = mallinfo2(); }
        catch (EntryPointNotFoundException) { Skip.If(true, "mallinfo2 needs glibc 2.33 or later"); }
        // 40 MB: above glibc's largest mmap threshold (32 MB), below a thread arena's heap size (64 MB).
        using var t = empty(10L << 20, ScalarType.Float32);
        var after = mallinfo2();
        Assert.True(after.MmapBytes < before.MmapBytes + (40L << 20),
            $"mmapped bytes grew from {before.MmapBytes} to {after.MmapBytes} with one 40 MB tensor");
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct MallInfo2
    {
        public nuint Arena, OrdBlks, SmBlks, HBlks;
        public nuint HBlkHd; // bytes in mmapped regions
        public nuint UsmBlks, FsmBlks, UordBlks, FordBlks, KeepCost;
        public readonly long MmapBytes => (long)HBlkHd;
    }

    [LibraryImport("libc")]
    private static partial MallInfo2 mallinfo2();
}
