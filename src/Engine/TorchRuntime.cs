using System.Runtime.InteropServices;

namespace LocalVllm.Engine;

/// <summary>
/// Process-wide threading settings for libtorch, applied before the first tensor is made. libtorch's OpenMP workers
/// spin-wait after each parallel region by default; on a small machine those spinning threads take the cores that the
/// engine's own parallel code (the paged-attention kernel) needs next. Unless the user set it, OMP_WAIT_POLICY is set
/// to PASSIVE (measured: decode attention 100 -> 67 ms per step on Qwen3-0.6B, 16 sequences, 2 cores).
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
    }

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int setenv(string name, string value, int overwrite);
}
