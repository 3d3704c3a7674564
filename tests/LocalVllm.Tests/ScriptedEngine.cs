using System.Runtime.CompilerServices;
using LocalVllm.Engine;
using LocalVllm.Engine.Loading;
using LocalVllm.Engine.Models;
using LocalVllm.Engine.Text.Templating;
using LocalVllm.Engine.Text.Tokenization;

namespace LocalVllm.Tests;

/// <summary>
/// The test double at the engine seam: the real Qwen3 chat template and tokenizer, but the model's output is scripted
/// (random-weight models never emit tool calls). Each script is a list of streamed text chunks, one per "token".
/// </summary>
internal sealed class ScriptedEngine : ILocalVllmEngine
{
    private readonly ModelDirectory _dir = ModelDirectory.Open(Fixtures.Model("tiny-qwen3-chat"));
    private readonly ModelTokenizer _tokenizer;
    private readonly Queue<string[]> _scripts = new();

    public ScriptedEngine(params string[][] scripts) : this(null, scripts) { }

    public ScriptedEngine(string? templateSource, params string[][] scripts)
    {
        _tokenizer = ModelTokenizer.Load(_dir);
        ChatTemplate = templateSource is null ? ChatTemplate.Load(_dir)! : new ChatTemplate(templateSource);
        foreach (var s in scripts) _scripts.Enqueue(s);
    }

    public List<string> Prompts { get; } = [];
    /// <summary>When set, a stream stays open after its last chunk (no finish) until it is cancelled.</summary>
    public bool HoldOpen { get; init; }
    /// <summary>When set, a stream throws this after its chunks instead of finishing (the engine failed the request mid-stream).</summary>
    public Exception? FailWith { get; init; }
    /// <summary>Completed when a held-open stream was cancelled (the request was aborted).</summary>
    public TaskCompletionSource Cancelled { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    public List<SamplingParams> Samplings { get; } = [];
    public string ModelId => "scripted-qwen3";
    public ChatTemplate ChatTemplate { get; }
    public GenerationConfig Defaults => _dir.Generation;
    public int MaxModelLen => 40960;
    public RequestValidator Validator { get; } = new(vocabSize: 151936, maxModelLen: 40960, kvCacheBlocks: 4096, blockSize: 16);
    public int[] EncodeChatPrompt(string renderedPrompt)
    {
        Prompts.Add(renderedPrompt);
        return _tokenizer.Encode(renderedPrompt, addSpecialTokens: false);
    }

    public List<IReadOnlyList<int>> Pinned { get; } = [];
    public Task<string> PinAsync(IReadOnlyList<int> prefixTokenIds, CancellationToken cancellationToken)
    {
        Pinned.Add(prefixTokenIds);
        return Task.FromResult($"pin-{Pinned.Count}");
    }
    public Task<bool> UnpinAsync(string pinId) => Task.FromResult(true);

    public async IAsyncEnumerable<RequestOutput> GenerateAsync(IReadOnlyList<int> promptTokenIds, SamplingParams sampling, string requestId,
        [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        Samplings.Add(sampling);
        var chunks = _scripts.Dequeue();
        for (int i = 0; i < chunks.Length; i++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            await Task.Yield();
            bool last = i == chunks.Length - 1 && !HoldOpen && FailWith is null;
            // One chunk per output, as the engine's delta outputs carry it.
            yield return new RequestOutput
            {
                RequestId = requestId,
                PromptTokenIds = promptTokenIds,
                Outputs = [new CompletionOutput { Index = 0, Text = chunks[i], TokenIds = new int[1], FinishReason = last ? FinishReasons.Stop : null }],
                Finished = last,
                NumCachedTokens = 16,
            };
        }
        if (FailWith is not null) throw FailWith;
        if (HoldOpen)
        {
            using var registration = cancellationToken.Register(() => Cancelled.TrySetResult());
            await Cancelled.Task; // ends only when the request is cancelled
            cancellationToken.ThrowIfCancellationRequested();
        }
    }
}
