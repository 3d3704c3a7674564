using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// Asks Linux to back large, long-lived CPU tensors (weights, the KV cache) with 2 MiB transparent huge pages. With
/// THP in "madvise" mode (Debian's default) anonymous memory otherwise stays in 4 KiB pages, and streaming 2.4 GB of
/// weights per decode step then walks the page tables every 4 KiB. MADV_HUGEPAGE marks the range for huge pages and
/// MADV_COLLAPSE (Linux 6.1+) converts what is already there; both are hints: where the kernel refuses, nothing
/// changes. No-op off Linux and for tensors not on the CPU.
/// </summary>
internal static unsafe partial class HugePages
{
    private const int MadvHugePage = 14, MadvCollapse = 25;
    private const long Huge = 2L << 20;

    /// <summary>Set to false by <c>LOCALVLLM_HUGE_PAGES=0</c> (for measuring the difference).</summary>
    public static bool Enabled { get; } = Environment.GetEnvironmentVariable("LOCALVLLM_HUGE_PAGES") != "0";

    public static void Advise(Tensor t)
    {
        if (!Enabled || !OperatingSystem.IsLinux() || t.device_type != TorchSharp.DeviceType.CPU || !t.is_contiguous()) return;
        var data = t.bytes;
        long bytes = data.Length;
        if (bytes < 2 * Huge) return;
        long start, end;
        unsafe { start = (long)System.Runtime.CompilerServices.Unsafe.AsPointer(ref MemoryMarshal.GetReference(data)); }
        end = start + bytes;
        long alignedStart = (start + Huge - 1) & ~(Huge - 1), alignedEnd = end & ~(Huge - 1);
        if (alignedEnd <= alignedStart) return;
        try
        {
            _ = madvise((nint)alignedStart, (nuint)(alignedEnd - alignedStart), MadvHugePage);
            _ = madvise((nint)alignedStart, (nuint)(alignedEnd - alignedStart), MadvCollapse);
        }
        catch (DllNotFoundException) { }
        catch (EntryPointNotFoundException) { }
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial int madvise(nint addr, nuint length, int advice);
}
