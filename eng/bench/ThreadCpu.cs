namespace LocalVllm.Bench;

/// <summary>CPU time (user + system, counted by the kernel in ticks of 10 ms) of this process's threads by name, from /proc/self/task.</summary>
internal static class ThreadCpu
{
    public static Dictionary<string, long> Snapshot()
    {
        var byThread = new Dictionary<string, long>();
        if (!Directory.Exists("/proc/self/task")) return byThread; // not Linux: no figures by thread
        foreach (var dir in Directory.GetDirectories("/proc/self/task"))
        {
            try
            {
                var stat = File.ReadAllText(Path.Combine(dir, "stat"));
                int open = stat.IndexOf('('), close = stat.LastIndexOf(')');
                var fields = stat[(close + 2)..].Split(' ');
                long ticks = long.Parse(fields[11]) + long.Parse(fields[12]);
                byThread[Path.GetFileName(dir) + ":" + stat[(open + 1)..close]] = ticks;
            }
            catch (IOException) { } // a thread that ended meanwhile
        }
        return byThread;
    }

    /// <summary>The CPU milliseconds each thread group (the thread name without digits) used between two snapshots.</summary>
    public static Dictionary<string, double> Difference(Dictionary<string, long> before, Dictionary<string, long> after)
    {
        var groups = new Dictionary<string, double>();
        foreach (var (key, ticks) in after)
        {
            long used = ticks - before.GetValueOrDefault(key);
            if (used <= 0) continue;
            var name = new string(key[(key.IndexOf(':') + 1)..].Where(c => !char.IsDigit(c)).ToArray()).Trim();
            groups[name] = groups.GetValueOrDefault(name) + used * 10.0;
        }
        return groups;
    }

    public static string Format(IReadOnlyDictionary<string, double> groups, string unit = "ms") =>
        string.Join(", ", groups.OrderByDescending(g => g.Value).Select(g => $"{g.Key} {g.Value:F0} {unit}"));
}
