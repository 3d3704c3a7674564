using System.Runtime.CompilerServices;
using System.Threading.Channels;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Diagnostics;
using LocalVllm.Engine.Text.Templating;

namespace LocalVllm.Engine;

/// <summary>
/// The engine behind a background loop: one thread owns all engine state; callers add requests and receive their
/// outputs as streams through channels. Many callers may generate at once; their requests batch together.
/// Cancelling a stream (its token, or leaving the enumeration early) aborts the request and frees its blocks.
/// </summary>
public sealed class AsyncLlmEngine : IDisposable
{
    private abstract record Command;
    private sealed record AddCommand(string Id, int[] Prompt, SamplingParams Sampling, string? Text, DateTimeOffset? Deadline, Channel<RequestOutput> Output, LoraRequest? Lora) : Command;
    private sealed record AbortCommand(string Id) : Command;
    private sealed record CallCommand(Action<LlmEngine> Action, TaskCompletionSource Done) : Command;
    private sealed record IdleCommand(TaskCompletionSource Done) : Command;

    private readonly Channel<Command> _commands = Channel.CreateUnbounded<Command>(new UnboundedChannelOptions { SingleReader = true });
    private readonly Dictionary<string, Channel<RequestOutput>> _streams = [];
    /// <summary>Callers of <see cref="WhenIdleAsync"/> waiting for the engine to have nothing unfinished (loop thread only).</summary>
    private readonly List<TaskCompletionSource> _idleWaiters = [];
    private readonly Thread _thread;
    private readonly CancellationTokenSource _stop = new();
    private long _nextId;
    private int _queuedAdds;
    private volatile bool _disposed;

    /// <summary>Loads the model and starts the engine loop; rejected and failed requests are logged to <paramref name="logger"/>.</summary>
    public AsyncLlmEngine(EngineOptions options, Microsoft.Extensions.Logging.ILogger? logger = null) : this(new LlmEngine(options, logger)) { }

    /// <summary>Takes ownership of <paramref name="engine"/> and starts the loop.</summary>
    public AsyncLlmEngine(LlmEngine engine)
    {
        Engine = engine;
        _thread = new Thread(Loop) { IsBackground = true, Name = "LocalVllm engine loop" };
        _thread.Start();
    }

    /// <summary>The engine core; touch its state only through <see cref="InvokeAsync"/>.</summary>
    public LlmEngine Engine { get; }

    /// <summary>Stats as of the last step (safe from any thread).</summary>
    public EngineStats Stats => Engine.LastStats ?? new EngineStats();

    /// <summary>
    /// Submits a request and streams its outputs: one per step in which it made progress, the last with
    /// <see cref="RequestOutput.Finished"/> set, each in the request's <see cref="SamplingParams.OutputKind"/>
    /// (<see cref="RequestOutputKind.Delta"/> for streaming: each output then holds only the new text and tokens).
    /// Invalid requests throw before anything is queued.
    /// </summary>
    public async IAsyncEnumerable<RequestOutput> GenerateAsync(IReadOnlyList<int> promptTokenIds, SamplingParams? sampling = null,
        string? requestId = null, string? prompt = null, [EnumeratorCancellation] CancellationToken cancellationToken = default,
        DateTimeOffset? deadline = null, LoraRequest? lora = null)
    {
        var reader = Submit(promptTokenIds, sampling, requestId, prompt, deadline, lora, out var id);
        bool finished = false;
        using var registration = cancellationToken.Register(() => Abort(id));
        try
        {
            while (true)
            {
                RequestOutput output;
                try
                {
                    if (!await reader.WaitToReadAsync(cancellationToken).ConfigureAwait(false)) break;
                    if (!reader.TryRead(out output!)) continue;
                }
                catch (ChannelClosedException e) when (e.InnerException is not null)
                {
                    throw e.InnerException;
                }
                if (output.Finished) finished = true;
                if (output.Finished && output.Outputs.All(o => o.FinishReason == FinishReasons.Abort) && cancellationToken.IsCancellationRequested)
                    cancellationToken.ThrowIfCancellationRequested();
                yield return output;
                if (finished) yield break;
            }
            ObjectDisposedException.ThrowIf(_disposed, this);
        }
        finally
        {
            if (!finished) Abort(id);
        }
    }

    /// <summary>Runs a request to completion and returns its final output.</summary>
    public async Task<RequestOutput> GenerateFinalAsync(IReadOnlyList<int> promptTokenIds, SamplingParams? sampling = null,
        CancellationToken cancellationToken = default, LoraRequest? lora = null)
    {
        RequestOutput? last = null;
        var final = (sampling ?? new SamplingParams()) with { OutputKind = RequestOutputKind.FinalOnly };
        await foreach (var o in GenerateAsync(promptTokenIds, final, cancellationToken: cancellationToken, lora: lora).ConfigureAwait(false)) last = o;
        return last ?? throw new InvalidOperationException("The engine ended the request without output.");
    }

    /// <summary>
    /// Beam search over token-id prompts (<see cref="Llm.BeamSearch(IReadOnlyList{IReadOnlyList{int}}, BeamSearchParams, LoraRequest?)"/>),
    /// its one-token requests batched with everything else the engine runs; cancelling aborts the step in flight.
    /// </summary>
    public Task<IReadOnlyList<BeamSearchOutput>> BeamSearchAsync(IReadOnlyList<IReadOnlyList<int>> promptTokenIds, BeamSearchParams beamSearch,
        IReadOnlyList<string?>? promptTexts = null, CancellationToken cancellationToken = default, LoraRequest? lora = null)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        ArgumentNullException.ThrowIfNull(beamSearch);
        ObjectDisposedException.ThrowIf(_disposed, this);
        beamSearch.Validate(Engine.Validator.MaxLogprobs);
        foreach (var prompt in promptTokenIds) Engine.Validator.ValidatePrompt(prompt);
        var prompts = promptTokenIds.Select((p, i) => (p, promptTexts?[i])).ToArray();
        return BeamSearcher.RunAsync(prompts, beamSearch, new HashSet<int>(Engine.Directory.EosTokenIds), Llm.MaxBeamLength(Engine), Llm.Decoder(Engine),
            async (beams, sampling) => await Task.WhenAll(beams.Select(b => GenerateFinalAsync(b, sampling, cancellationToken, lora))).ConfigureAwait(false));
    }

    /// <summary>
    /// Computes each prefix (if not cached) and pins its full blocks so they are never evicted; returns the pin ids,
    /// for <see cref="UnpinAsync"/>. Use it at start-up for system prompts and tool lists that every call shares.
    /// </summary>
    public async Task<IReadOnlyList<string>> WarmUpAsync(IEnumerable<IReadOnlyList<int>> prefixes, CancellationToken cancellationToken = default)
    {
        var pins = new List<string>();
        foreach (var ids in prefixes)
        {
            var pinId = $"pin-{Interlocked.Increment(ref _nextId)}";
            var channel = Channel.CreateUnbounded<RequestOutput>();
            await InvokeAsync(e => _streams[e.AddPinRequest(ids, pinId)] = channel).ConfigureAwait(false);
            await foreach (var _ in channel.Reader.ReadAllAsync(cancellationToken).ConfigureAwait(false)) { }
            pins.Add(pinId);
        }
        return pins;
    }

    /// <summary>Releases a pinned prefix; its blocks stay cached until evicted.</summary>
    public async Task<bool> UnpinAsync(string pinId)
    {
        bool removed = false;
        await InvokeAsync(e => removed = e.Unpin(pinId)).ConfigureAwait(false);
        return removed;
    }

    /// <summary>Aborts a request (no-op when it has finished).</summary>
    public void Abort(string requestId)
    {
        if (!_disposed) _commands.Writer.TryWrite(new AbortCommand(requestId));
    }

    /// <summary>
    /// Completes once the engine has no unfinished request (at once when it has none): after aborts and cancellations
    /// have been applied, what a caller waits for before checking that every block is free, or before draining.
    /// </summary>
    public Task WhenIdleAsync()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        if (!_commands.Writer.TryWrite(new IdleCommand(done))) throw Disposed();
        return done.Task;
    }

    /// <summary>Embeddings of token-id prompts (<see cref="LlmEngine.Embed"/>), computed on the engine thread between steps.</summary>
    public async Task<float[][]> EmbedAsync(IReadOnlyList<IReadOnlyList<int>> prompts, EmbeddingPooling pooling = EmbeddingPooling.Last, bool normalize = true)
    {
        float[][]? result = null;
        await InvokeAsync(e => result = e.Embed(prompts, pooling, normalize)).ConfigureAwait(false);
        return result!;
    }

    /// <summary>Runs <paramref name="action"/> on the engine thread between steps (for stats, tests and tools).</summary>
    public Task InvokeAsync(Action<LlmEngine> action)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        // After Dispose completes the channel, a write fails: the caller learns at once instead of waiting forever.
        if (!_commands.Writer.TryWrite(new CallCommand(action, done))) throw Disposed();
        return done.Task;
    }

    private ChannelReader<RequestOutput> Submit(IReadOnlyList<int> promptTokenIds, SamplingParams? sampling, string? requestId, string? prompt,
        DateTimeOffset? deadline, LoraRequest? lora, out string id)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        sampling ??= new SamplingParams();
        id = requestId ?? $"areq-{Interlocked.Increment(ref _nextId)}";
        try
        {
            Engine.Validator.Validate(promptTokenIds, sampling);
            // Reject at once, on the caller's thread, when the waiting queue (as of the last step) plus adds not yet
            // taken by the loop is full: an overloaded engine answers immediately instead of making callers hang.
            Engine.Validator.CheckQueue(Stats.Waiting + Volatile.Read(ref _queuedAdds), sampling, id);
        }
        catch (Exception e)
        {
            EngineLog.Rejected(Engine.Logger, id, e.Message);
            throw;
        }
        var channel = Channel.CreateUnbounded<RequestOutput>(new UnboundedChannelOptions { SingleWriter = true, SingleReader = true });
        Interlocked.Increment(ref _queuedAdds);
        if (!_commands.Writer.TryWrite(new AddCommand(id, promptTokenIds.ToArray(), sampling, prompt, deadline, channel, lora)))
        {
            Interlocked.Decrement(ref _queuedAdds);
            throw Disposed();
        }
        return channel.Reader;
    }

    private void Loop()
    {
        var reader = _commands.Reader;
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                if (!Engine.HasUnfinishedRequests && _idleWaiters.Count > 0)
                {
                    foreach (var waiter in _idleWaiters) waiter.TrySetResult();
                    _idleWaiters.Clear();
                }
                if (!Engine.HasUnfinishedRequests)
                {
                    // Idle: block until a command arrives.
                    if (!reader.WaitToReadAsync(_stop.Token).AsTask().GetAwaiter().GetResult()) break;
                }
                while (reader.TryRead(out var command)) Handle(command);
                if (!Engine.HasUnfinishedRequests) continue;
                List<RequestOutput> outputs;
                try
                {
                    outputs = Engine.Step();
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    FailAll(e);
                    continue;
                }
                foreach (var o in outputs) Deliver(o);
            }
            catch (OperationCanceledException) when (_stop.IsCancellationRequested)
            {
                break;
            }
        }
        foreach (var (id, channel) in _streams)
            channel.Writer.TryComplete(new ObjectDisposedException(nameof(AsyncLlmEngine), $"The engine was disposed while request '{id}' was running."));
        _streams.Clear();
        foreach (var waiter in _idleWaiters) waiter.TrySetException(Disposed());
        _idleWaiters.Clear();
        // Dispose completed the command channel before it stopped the loop, so nothing more can arrive: every command
        // still queued is answered, none is left waiting.
        while (reader.TryRead(out var command))
            switch (command)
            {
                case AddCommand add:
                    Interlocked.Decrement(ref _queuedAdds);
                    add.Output.Writer.TryComplete(new ObjectDisposedException(nameof(AsyncLlmEngine), $"The engine was disposed before request '{add.Id}' started."));
                    break;
                case CallCommand call:
                    call.Done.TrySetException(Disposed());
                    break;
                case IdleCommand idle:
                    idle.Done.TrySetException(Disposed());
                    break;
            }
    }

    private ObjectDisposedException Disposed() => new(nameof(AsyncLlmEngine), "The engine has been disposed.");

    private void Handle(Command command)
    {
        switch (command)
        {
            case AddCommand add:
                Interlocked.Decrement(ref _queuedAdds);
                try
                {
                    Engine.AddRequest(add.Prompt, add.Sampling, add.Id, add.Text, add.Deadline, add.Lora);
                    _streams[add.Id] = add.Output;
                }
                catch (Exception e)
                {
                    add.Output.Writer.TryComplete(e);
                }
                break;
            case AbortCommand abort:
                if (Engine.Abort(abort.Id) is { } final) Deliver(final);
                break;
            case CallCommand call:
                try { call.Action(Engine); call.Done.TrySetResult(); }
                catch (Exception e) { call.Done.TrySetException(e); }
                break;
            case IdleCommand idle:
                _idleWaiters.Add(idle.Done); // answered at the top of the loop, once nothing is unfinished
                break;
        }
    }

    private void Deliver(RequestOutput output)
    {
        if (!_streams.TryGetValue(output.RequestId, out var channel)) return;
        if (output.Error is not null || output.Outputs.Any(o => o.FinishReason == FinishReasons.Timeout))
        {
            channel.Writer.TryComplete(output.Error ?? new TimeoutException($"Request '{output.RequestId}' passed its deadline."));
            _streams.Remove(output.RequestId);
            return;
        }
        channel.Writer.TryWrite(output);
        if (output.Finished)
        {
            channel.Writer.TryComplete();
            _streams.Remove(output.RequestId);
        }
    }

    /// <summary>A failure in the step (e.g. the forward pass) fails the requests in flight; the engine carries on.</summary>
    private void FailAll(Exception e)
    {
        foreach (var (id, channel) in _streams.ToArray())
        {
            Engine.Abort(id);
            channel.Writer.TryComplete(new InvalidOperationException($"Request '{id}' failed in the engine step: {e.Message}", e));
        }
        _streams.Clear();
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _commands.Writer.TryComplete(); // first: after this no command can be queued, so the loop's final drain sees them all
        _stop.Cancel();
        _thread.Join();
        Engine.Dispose();
        _stop.Dispose();
    }
}
