using LocalVllm.Engine.Text.Tokenization;

namespace LocalVllm.Engine.Core;

/// <summary>Where a sequence is in its life.</summary>
public enum SequenceStatus { Waiting, Running, Finished }

/// <summary>
/// One completion being generated: its tokens (prompt then output), how many of them have K/V in the cache, and the
/// blocks that hold them. Owned by the engine thread.
/// </summary>
public sealed class Sequence
{
    private readonly List<int> _tokens;
    // The output tokens again, append-only: a snapshot (array, count) stays valid and unchanged as tokens are added,
    // because growing copies into a new array and never writes below the count. Each step's outputs share it.
    private int[] _output = new int[16];
    private int _outputCount;

    internal Sequence(string requestId, int index, int[] promptTokenIds, SamplingParams sampling, long arrivalTicks, long? unseededSeed = null)
    {
        RequestId = requestId;
        Index = index;
        PromptTokenIds = promptTokenIds;
        Sampling = sampling;
        _tokens = [.. promptTokenIds];
        ArrivalTicks = arrivalTicks;
        long seed = sampling.Seed is long s ? s + index : unseededSeed ?? Random.Shared.NextInt64();
        _cacheSalt = sampling.CacheSalt is { } salt ? System.IO.Hashing.XxHash64.HashToUInt64(System.Text.Encoding.UTF8.GetBytes("cache_salt/" + salt)) : 0;
        Random = new Random(unchecked((int)(seed ^ (seed >> 32))));
    }

    /// <summary>The LoRA adapter this sequence runs under, or null for the base model.</summary>
    internal Lora.LoraAdapter? Lora { get; init; }
    /// <summary>
    /// Mixed into the hash of the first block, so that prefixes computed under different adapters, or for requests with
    /// different cache salts, never match.
    /// </summary>
    internal ulong PrefixSalt => (Lora?.PrefixSalt ?? 0) ^ _cacheSalt;
    private readonly ulong _cacheSalt;

    public string RequestId { get; }
    /// <summary>Which of the request's N completions this is.</summary>
    public int Index { get; }
    public int[] PromptTokenIds { get; }
    public SamplingParams Sampling { get; }
    public SequenceStatus Status { get; internal set; } = SequenceStatus.Waiting;
    /// <summary>Prompt then generated tokens.</summary>
    public IReadOnlyList<int> Tokens => _tokens;
    public int NumTokens => _tokens.Count;
    public int NumPromptTokens => PromptTokenIds.Length;
    public int NumOutputTokens => _tokens.Count - PromptTokenIds.Length;
    /// <summary>Tokens whose K/V are in the cache.</summary>
    public int NumComputedTokens { get; internal set; }
    /// <summary>Prompt tokens found in the prefix cache when the sequence was first scheduled.</summary>
    public int NumCachedPromptTokens { get; internal set; }
    /// <summary>The sequence's blocks, in order.</summary>
    public List<int> BlockTable { get; } = [];
    /// <summary>Chained hashes of the sequence's full blocks (prefix caching), computed as blocks fill.</summary>
    internal List<ulong> BlockHashes { get; } = [];
    /// <summary>Leading blocks of the table already registered in the prefix cache.</summary>
    internal int NumRegisteredBlocks { get; set; }
    internal Random Random { get; }
    /// <summary>Steps in which later requests were admitted ahead of this one (bounded-wait fairness).</summary>
    internal int TimesPassedOver { get; set; }
    /// <summary>Steps this request waited for another to compute the head they share.</summary>
    internal int TimesDeferred { get; set; }
    public string? FinishReason { get; internal set; }
    public object? StopReason { get; internal set; }
    internal List<PositionLogprobs>? OutputLogprobs { get; set; }
    internal PositionLogprobs?[]? PromptLogprobs { get; set; }
    internal long ArrivalTicks { get; }
    /// <summary>The structured-output constraint's state, when the request has one.</summary>
    internal Structured.SequenceConstraint? Constraint { get; set; }
    /// <summary>Streams the output as text, when the engine has a tokenizer.</summary>
    internal IncrementalDetokenizer? Detokenizer { get; set; }
    internal long? FirstTokenTicks { get; set; }
    /// <summary>The tokens that may not be sampled before <see cref="SamplingParams.MinTokens"/> (EOS unless ignored, stop token ids), or null.</summary>
    internal int[]? MinTokensStopIds { get; set; }
    /// <summary>The token sequences of <see cref="SamplingParams.BadWords"/> (shared by a request's sequences), or null.</summary>
    internal int[][]? BadWordIds { get; set; }
    /// <summary>When the scheduler first admitted the sequence (the end of its time in the queue).</summary>
    internal long? FirstScheduledTicks { get; set; }
    /// <summary>Output tokens already handed out in an output (and, for delta outputs, their log-probabilities).</summary>
    internal int NumOutputTokensSent { get; set; }
    /// <summary>Whether an output has already reported this sequence's finish.</summary>
    internal bool FinishSent { get; set; }
    internal long? LastTokenTicks { get; set; }
    /// <summary>Whether this step's tokens finish the known tokens, so the step samples the next one.</summary>
    internal bool SamplesAfter(int numNewTokens) => NumComputedTokens + numNewTokens == NumTokens;

    internal IEnumerable<int> OutputTokenIds => _tokens.Skip(PromptTokenIds.Length);

    internal List<int> TokenList => _tokens;

    internal void Append(int token)
    {
        _tokens.Add(token);
        if (_outputCount == _output.Length) Array.Resize(ref _output, _output.Length * 2);
        _output[_outputCount++] = token;
    }

    /// <summary>
    /// Drops the tokens after the first <paramref name="numTokens"/> (speculative tokens past a stop). Only before any
    /// output has handed them out: snapshots taken earlier end below the new count and stay as they were.
    /// </summary>
    internal void TruncateTo(int numTokens)
    {
        int drop = _tokens.Count - numTokens;
        if (drop <= 0) return;
        _tokens.RemoveRange(numTokens, drop);
        _outputCount -= drop;
    }

    /// <summary>
    /// The output tokens so far, as an immutable snapshot that later tokens do not change. No copy: every step hands
    /// each progressing request its cumulative ids, which would otherwise cost a copy of the whole output per step.
    /// </summary>
    public IReadOnlyList<int> OutputTokens() => OutputTokens(0);

    /// <summary>The output tokens from index <paramref name="from"/> on (a delta), as an immutable snapshot.</summary>
    internal IReadOnlyList<int> OutputTokens(int from) => new TokenSnapshot(_output, from, _outputCount - from);

    private sealed class TokenSnapshot(int[] tokens, int offset, int count) : IReadOnlyList<int>
    {
        public int this[int index] => (uint)index < (uint)count ? tokens[offset + index] : throw new ArgumentOutOfRangeException(nameof(index));
        public int Count => count;
        public IEnumerator<int> GetEnumerator()
        {
            for (int i = 0; i < count; i++) yield return tokens[offset + i];
        }
        System.Collections.IEnumerator System.Collections.IEnumerable.GetEnumerator() => GetEnumerator();
        public override string ToString() => $"[{string.Join(", ", tokens.Skip(offset).Take(count))}]";
    }
}
