using System.Threading.Channels;

namespace LocalVllm.Server;

/// <summary>
/// Several streams of one response (n completions, or several prompts) read side by side into one queue of
/// (stream index, item), a null item marking a stream's end, so the handler writes each item as it comes. The first
/// item of every stream is read before anything else (<see cref="StartAsync"/>), so an overloaded engine or a bad
/// request fails before the response has started. Disposing waits for the readers to stop, then disposes the streams
/// (a request that went away cancels them).
/// </summary>
internal sealed class MergedStreams<T>(IReadOnlyList<IAsyncEnumerator<T>> streams) : IAsyncDisposable where T : class
{
    private readonly Channel<(int Index, T? Item)> _queue = Channel.CreateUnbounded<(int, T?)>();
    private List<Task>? _pumps;

    public int Count => streams.Count;
    private T?[] _firstItems = [];

    /// <summary>Stream <paramref name="index"/>'s first item, read by <see cref="StartAsync"/> (null when it had none); it still comes through <see cref="ReadAsync"/>.</summary>
    public T? First(int index) => _firstItems[index];

    /// <summary>Reads each stream's first item, then starts reading them all into the queue.</summary>
    public async Task StartAsync()
    {
        var firsts = new bool[streams.Count];
        _firstItems = new T?[streams.Count];
        for (int i = 0; i < streams.Count; i++)
            if (firsts[i] = await streams[i].MoveNextAsync()) _firstItems[i] = streams[i].Current;
        _pumps = streams.Select(async (stream, i) =>
        {
            try
            {
                for (bool any = firsts[i]; any; any = await stream.MoveNextAsync()) await _queue.Writer.WriteAsync((i, stream.Current));
                await _queue.Writer.WriteAsync((i, null)); // this stream is done
            }
            catch (Exception e)
            {
                _queue.Writer.TryComplete(e);
            }
        }).ToList();
    }

    /// <summary>The next item of any stream (null: that stream ended); a stream's failure is thrown here.</summary>
    public ValueTask<(int Index, T? Item)> ReadAsync(CancellationToken cancellationToken) => _queue.Reader.ReadAsync(cancellationToken);

    /// <summary>Whether another item is already waiting (the handler flushes only when none is).</summary>
    public bool MoreWaiting => _queue.Reader.TryPeek(out _);

    /// <summary>Completes when every stream has been read to its end.</summary>
    public Task Completion => _pumps is null ? Task.CompletedTask : Task.WhenAll(_pumps);

    public async ValueTask DisposeAsync()
    {
        // A stream is disposed only once its reader has stopped reading it.
        if (_pumps is not null) await Task.WhenAll(_pumps.Select(p => p.ContinueWith(_ => { }, TaskScheduler.Default)));
        foreach (var stream in streams) await stream.DisposeAsync();
    }
}
