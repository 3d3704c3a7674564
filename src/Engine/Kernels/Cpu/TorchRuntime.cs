using System.Runtime.InteropServices;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// Process-wide settings, applied before the first tensor is made.
/// <list type="bullet">
/// <item>Threads: libtorch's OpenMP workers spin-wait after each parallel region by default; on a small machine those
/// spinning threads take the cores that the engine's own parallel code needs next. Unless the user set it,
/// OMP_WAIT_POLICY is set to PASSIVE (measured: decode attention 100 -> 67 ms per step on Qwen3-0.6B, 16 sequences,
/// 2 cores).</item>
/// <item>Memory: glibc serves every allocation over 32 MB with a fresh mmap and unmaps it on free, so each step's large
/// activations (a 2,048-token chunk's gate/up output is 50 MB, 64 sequences' logits 39 MB) page-fault in again, 4 KiB
/// at a time. With mmap off for malloc and trimming off, they come from the heap and are reused (measured: prefill
/// GEMMs 5-8% faster). The process keeps its peak heap instead of returning it to the system, as an inference server
/// would anyway. <c>LOCALVLLM_MALLOC_TUNING=0</c> leaves glibc's defaults.</item>
/// </list>
/// </summary>
internal static partial class TorchRuntime
{
    private static int _configured;

    public static void Configure()
    {
        if (Interlocked.Exchange(ref _configured, 1) == 1 || !OperatingSystem.IsLinux()) return;
        if (Environment.GetEnvironmentVariable("OMP_WAIT_POLICY") is null)
        {
            try { _ = setenv("OMP_WAIT_POLICY", "PASSIVE", 0); }
            catch (DllNotFoundException) { } // not glibc: leave the default
            catch (EntryPointNotFoundException) { }
        }
        if (Environment.GetEnvironmentVariable("LOCALVLLM_MALLOC_TUNING") != "0")
        {
            try
            {
                _ = mallopt(MallocMmapMax, 0);
                _ = mallopt(MallocTrimThreshold, int.MaxValue);
            }
            catch (DllNotFoundException) { } // not glibc (musl has no mallopt): leave the default
            catch (EntryPointNotFoundException) { }
        }
    }

    private const int MallocTrimThreshold = -1, MallocMmapMax = -4;

    [LibraryImport("libc")]
    private static partial int mallopt(int param, int value);

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int setenv(string name, string value, int overwrite);
}
