namespace LocalVllm.Engine.Diagnostics;

/// <summary>A one-line progress bar on stderr, shown only on an interactive terminal.</summary>
internal sealed class ProgressBar : IDisposable
{
    private readonly int _total;
    private readonly DateTime _start = DateTime.UtcNow;
    private int _done;

    private ProgressBar(int total) => _total = total;

    public static ProgressBar? Create(bool wanted, int total) =>
        wanted && !Console.IsErrorRedirected ? new ProgressBar(total) : null;

    public void Advance()
    {
        _done++;
        double secs = (DateTime.UtcNow - _start).TotalSeconds;
        int width = 30, filled = _total == 0 ? width : width * _done / _total;
        Console.Error.Write($"\rProcessed prompts [{new string('#', filled)}{new string('.', width - filled)}] {_done}/{_total} {secs:F1}s");
    }

    public void Dispose() => Console.Error.WriteLine();
}
