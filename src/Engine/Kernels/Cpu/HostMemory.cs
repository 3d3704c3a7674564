namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>The host's memory as the kernel reports it (Linux <c>/proc/meminfo</c>), for sizing the KV cache on the CPU.</summary>
internal static class HostMemory
{
    /// <summary>Bytes available for new allocations without swapping (<c>MemAvailable</c>), or null where unknown.</summary>
    public static long? AvailableBytes()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
                if (line.StartsWith("MemAvailable:", StringComparison.Ordinal))
                {
                    var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                    return long.Parse(parts[1], System.Globalization.CultureInfo.InvariantCulture) * 1024;
                }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
        }
        return null;
    }
}
