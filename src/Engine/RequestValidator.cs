namespace LocalVllm.Engine;

/// <summary>
/// The one set of rules a request must meet, checked before it touches engine state: the offline API
/// (<see cref="Llm"/>), the async engine and the chat provider all call it, so a bad value gets the same exception and
/// message on every path. Messages name the field (with its chat and HTTP names where they differ) and its limit.
/// Immutable and safe to call from any thread.
/// </summary>
public sealed class RequestValidator
{
    /// <summary>Rules for a model served with these limits.</summary>
    /// <param name="vocabSize">Token ids must lie in [0, vocabSize).</param>
    /// <param name="maxModelLen">The longest sequence (prompt plus output) served.</param>
    /// <param name="kvCacheBlocks">Blocks in the KV cache.</param>
    /// <param name="blockSize">Tokens per block.</param>
    /// <param name="maxWaitingRequests">Sequences that may wait for admission.</param>
    /// <param name="kvCacheOption">The option that set the cache's size (named in capacity messages).</param>
    /// <param name="contextLimitedByCache">Whether <paramref name="maxModelLen"/> was lowered to what the cache holds.</param>
    /// <param name="maxLogprobs">The most log-probabilities a request may ask for per position; -1: up to the vocabulary.</param>
    /// <param name="priorityScheduling">Whether requests may carry a priority (the engine schedules by priority).</param>
    public RequestValidator(int vocabSize, int maxModelLen, int kvCacheBlocks, int blockSize, int maxWaitingRequests = int.MaxValue,
        string kvCacheOption = "KvCacheMemoryBytes", bool contextLimitedByCache = false, int maxLogprobs = -1, bool priorityScheduling = false)
    {
        PriorityScheduling = priorityScheduling;
        ArgumentOutOfRangeException.ThrowIfLessThan(vocabSize, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxModelLen, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(kvCacheBlocks, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(blockSize, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(maxWaitingRequests);
        VocabSize = vocabSize;
        MaxModelLen = maxModelLen;
        KvCacheBlocks = kvCacheBlocks;
        BlockSize = blockSize;
        MaxWaitingRequests = maxWaitingRequests;
        KvCacheOption = kvCacheOption;
        ContextLimitedByCache = contextLimitedByCache;
        MaxLogprobs = maxLogprobs < 0 ? vocabSize : Math.Min(maxLogprobs, vocabSize);
    }

    /// <summary>The most log-probabilities per position a request may ask for (EngineOptions.MaxLogprobs, capped by the vocabulary).</summary>
    public int MaxLogprobs { get; }

    /// <summary>The option that set the KV cache's size: what a capacity message tells the user to raise.</summary>
    public string KvCacheOption { get; }
    /// <summary>Whether the context length is the KV cache's capacity rather than the model's.</summary>
    public bool ContextLimitedByCache { get; }

    private string ContextSource => ContextLimitedByCache
        ? $"the KV cache holds {KvCacheBlocks * BlockSize} tokens ({KvCacheBlocks} blocks of {BlockSize}; raise {KvCacheOption} for more)"
        : "max_position_embeddings / MaxModelLen";

    private string LogprobsLimit => MaxLogprobs == VocabSize ? $"vocabulary size {VocabSize}" : $"{MaxLogprobs}: EngineOptions.MaxLogprobs (--max-logprobs)";

    /// <summary>Token ids must lie in [0, VocabSize).</summary>
    public int VocabSize { get; }
    /// <summary>The longest sequence (prompt plus output) served.</summary>
    public int MaxModelLen { get; }
    /// <summary>Blocks in the KV cache.</summary>
    public int KvCacheBlocks { get; }
    /// <summary>Tokens per KV block.</summary>
    public int BlockSize { get; }
    /// <summary>Requests that may wait for admission before new ones are refused.</summary>
    public int MaxWaitingRequests { get; }

    /// <summary>
    /// The prompt the engine runs: its last <see cref="SamplingParams.TruncatePromptTokens"/> tokens when that is set
    /// (-1: as many as fit before <see cref="SamplingParams.MaxTokens"/>), else the prompt as given.
    /// </summary>
    public IReadOnlyList<int> Truncate(IReadOnlyList<int> promptTokenIds, SamplingParams sampling)
    {
        if (sampling.TruncatePromptTokens is not int k) return promptTokenIds;
        if (k == 0 || k < -1)
            throw new ArgumentOutOfRangeException(nameof(sampling.TruncatePromptTokens), k, "TruncatePromptTokens (truncate_prompt_tokens) must be at least 1, or -1 for as many as the context holds.");
        int keep = k == -1 ? Math.Max(1, MaxModelLen - sampling.MaxTokens) : k;
        return promptTokenIds.Count <= keep ? promptTokenIds : promptTokenIds.Skip(promptTokenIds.Count - keep).ToArray();
    }

    /// <summary>
    /// Checks the prompt (as <see cref="Truncate"/> leaves it), then the sampling parameters; throws
    /// <see cref="ArgumentException"/> naming the first bad value.
    /// </summary>
    public void Validate(IReadOnlyList<int> promptTokenIds, SamplingParams sampling)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        ArgumentNullException.ThrowIfNull(sampling);
        promptTokenIds = Truncate(promptTokenIds, sampling);
        ValidatePrompt(promptTokenIds);
        ValidateSampling(sampling);
        if ((long)promptTokenIds.Count + sampling.MaxTokens > MaxModelLen)
            throw new ArgumentException(
                $"The prompt has {promptTokenIds.Count} tokens and MaxTokens (max_tokens) is {sampling.MaxTokens}: {promptTokenIds.Count + (long)sampling.MaxTokens} tokens " +
                $"exceed the context length of {MaxModelLen} ({ContextSource}); MaxTokens may be at most {MaxModelLen - promptTokenIds.Count} for this prompt.",
                nameof(sampling));
    }

    /// <summary>The prompt is not empty, its ids are in the vocabulary, and it fits the context and the KV cache with one token to spare.</summary>
    public void ValidatePrompt(IReadOnlyList<int> promptTokenIds)
    {
        ArgumentNullException.ThrowIfNull(promptTokenIds);
        if (promptTokenIds.Count == 0) throw new ArgumentException("The prompt is empty: at least one token id is needed.", nameof(promptTokenIds));
        for (int i = 0; i < promptTokenIds.Count; i++)
            if (promptTokenIds[i] < 0 || promptTokenIds[i] >= VocabSize)
                throw new ArgumentOutOfRangeException(nameof(promptTokenIds), promptTokenIds[i],
                    $"Token id {promptTokenIds[i]} at prompt position {i} is outside the vocabulary [0, {VocabSize}).");
        if (promptTokenIds.Count >= MaxModelLen)
            throw new ArgumentException(
                $"The prompt has {promptTokenIds.Count} tokens but the model's context length is {MaxModelLen} ({ContextSource}); at least one token must be left to generate" +
                (ContextLimitedByCache ? $": this prompt needs a KV cache of at least {BlocksFor(promptTokenIds.Count + 1)} blocks." : "."),
                nameof(promptTokenIds));
        int capacity = KvCacheBlocks * BlockSize;
        if (promptTokenIds.Count + 1 > capacity)
            throw new ArgumentException(
                $"The prompt has {promptTokenIds.Count} tokens but the whole KV cache holds {capacity} tokens ({KvCacheBlocks} blocks of {BlockSize}); raise {KvCacheOption} to at least {BlocksFor(promptTokenIds.Count + 1)} blocks' worth.",
                nameof(promptTokenIds));
    }

    private int BlocksFor(int tokens) => (tokens + BlockSize - 1) / BlockSize;

    /// <summary>Whether requests may carry a <see cref="SamplingParams.Priority"/> (the engine schedules by priority).</summary>
    public bool PriorityScheduling { get; }

    /// <summary>Every sampling field is within its range; throws <see cref="ArgumentException"/> naming the field.</summary>
    public void ValidateSampling(SamplingParams p)
    {
        ArgumentNullException.ThrowIfNull(p);
        if (p.Priority != 0 && !PriorityScheduling)
            throw new ArgumentException($"Priority (priority) is {p.Priority}, but the engine schedules first come, first served: set EngineOptions.SchedulingPolicy (--scheduling-policy) to \"priority\".", nameof(p.Priority));
        if (p.CacheSalt is { Length: 0 }) throw new ArgumentException("CacheSalt (cache_salt) must be a non-empty string, or none.", nameof(p.CacheSalt));
        if (p.N < 1) throw new ArgumentOutOfRangeException(nameof(p.N), p.N, "N (n) must be at least 1.");
        if (p.N > MaxWaitingRequests)
            throw new ArgumentOutOfRangeException(nameof(p.N), p.N,
                $"N (n) = {p.N} completions can never be queued: the engine holds at most MaxWaitingRequests = {MaxWaitingRequests} waiting sequences.");
        if (float.IsNaN(p.Temperature) || p.Temperature < 0) throw new ArgumentOutOfRangeException(nameof(p.Temperature), p.Temperature, "Temperature must be >= 0 (0 is greedy).");
        if (!(p.TopP > 0 && p.TopP <= 1)) throw new ArgumentOutOfRangeException(nameof(p.TopP), p.TopP, "TopP (top_p) must be in (0, 1].");
        if (p.TopK < -1) throw new ArgumentOutOfRangeException(nameof(p.TopK), p.TopK, "TopK (top_k) must be -1 or 0 (both disable it) or a positive count.");
        if (!(p.MinP >= 0 && p.MinP <= 1)) throw new ArgumentOutOfRangeException(nameof(p.MinP), p.MinP, "MinP (min_p) must be in [0, 1].");
        if (!(p.RepetitionPenalty > 0)) throw new ArgumentOutOfRangeException(nameof(p.RepetitionPenalty), p.RepetitionPenalty, "RepetitionPenalty (repetition_penalty) must be > 0 (1 disables it).");
        if (!(p.PresencePenalty >= -2 && p.PresencePenalty <= 2)) throw new ArgumentOutOfRangeException(nameof(p.PresencePenalty), p.PresencePenalty, "PresencePenalty (presence_penalty) must be in [-2, 2].");
        if (!(p.FrequencyPenalty >= -2 && p.FrequencyPenalty <= 2)) throw new ArgumentOutOfRangeException(nameof(p.FrequencyPenalty), p.FrequencyPenalty, "FrequencyPenalty (frequency_penalty) must be in [-2, 2].");
        if (p.MaxTokens < 1) throw new ArgumentOutOfRangeException(nameof(p.MaxTokens), p.MaxTokens, "MaxTokens (ChatOptions.MaxOutputTokens, max_tokens) must be at least 1.");
        if (p.MinTokens < 0 || p.MinTokens > p.MaxTokens) throw new ArgumentOutOfRangeException(nameof(p.MinTokens), p.MinTokens, $"MinTokens (min_tokens) must be in [0, MaxTokens = {p.MaxTokens}].");
        if (p.Logprobs is < 0 || p.Logprobs > MaxLogprobs) throw new ArgumentOutOfRangeException(nameof(p.Logprobs), p.Logprobs, $"Logprobs (logprobs, top_logprobs) must be in [0, {LogprobsLimit}].");
        if (p.PromptLogprobs is < 0 || p.PromptLogprobs > MaxLogprobs) throw new ArgumentOutOfRangeException(nameof(p.PromptLogprobs), p.PromptLogprobs, $"PromptLogprobs (prompt_logprobs) must be in [0, {LogprobsLimit}].");
        if (p.LogitBias is { } logitBias)
            foreach (var (id, value) in logitBias)
            {
                if (id < 0 || id >= VocabSize) throw new ArgumentOutOfRangeException(nameof(p.LogitBias), id, $"Token id {id} in LogitBias (logit_bias) is outside the vocabulary [0, {VocabSize}).");
                if (!(value >= -100 && value <= 100)) throw new ArgumentOutOfRangeException(nameof(p.LogitBias), value, $"LogitBias (logit_bias) for token {id} is {value}; each bias must be in [-100, 100].");
            }
        if (p.AllowedTokenIds is { } allowed)
        {
            if (allowed.Count == 0) throw new ArgumentException("AllowedTokenIds (allowed_token_ids) must hold at least one token id; null allows any.", nameof(p.AllowedTokenIds));
            foreach (var id in allowed)
                if (id < 0 || id >= VocabSize) throw new ArgumentOutOfRangeException(nameof(p.AllowedTokenIds), id, $"Token id {id} in AllowedTokenIds (allowed_token_ids) is outside the vocabulary [0, {VocabSize}).");
        }
        foreach (var id in p.StopTokenIds)
            if (id < 0 || id >= VocabSize) throw new ArgumentOutOfRangeException(nameof(p.StopTokenIds), id, $"Stop token id {id} (StopTokenIds, stop_token_ids) is outside the vocabulary [0, {VocabSize}).");
        foreach (var w in p.BadWords)
            if (string.IsNullOrWhiteSpace(w)) throw new ArgumentException("Bad words (BadWords, bad_words) must not be empty.", nameof(p.BadWords));
        foreach (var s in p.Stop)
            if (string.IsNullOrEmpty(s)) throw new ArgumentException("Stop strings (Stop, ChatOptions.StopSequences, stop) must not be empty.", nameof(p.Stop));
        if (!Enum.IsDefined(p.OutputKind)) throw new ArgumentOutOfRangeException(nameof(p.OutputKind), p.OutputKind, "OutputKind must be Cumulative, Delta or FinalOnly.");
        if (p.StructuredOutputs is { } constraint)
        {
            if (!Enum.IsDefined(constraint.Whitespace)) throw new ArgumentOutOfRangeException(nameof(p.StructuredOutputs), constraint.Whitespace, "StructuredOutputs.Whitespace must be Compact or Flexible.");
            try
            {
                Structured.ConstraintCompiler.Compile(constraint);
            }
            catch (Structured.GrammarException e)
            {
                throw new ArgumentException($"StructuredOutputs (structured_outputs / response_format): {e.Message}", nameof(p.StructuredOutputs), e);
            }
        }
    }

    /// <summary>
    /// Refuses a request at once when <paramref name="waiting"/> requests already wait and its <see cref="SamplingParams.N"/>
    /// sequences would pass <see cref="MaxWaitingRequests"/>: throws <see cref="EngineOverloadedException"/>.
    /// </summary>
    public void CheckQueue(int waiting, SamplingParams sampling, string requestId)
    {
        if (waiting + sampling.N > MaxWaitingRequests)
            throw new EngineOverloadedException(
                $"The engine's waiting queue is full ({waiting} waiting, MaxWaitingRequests = {MaxWaitingRequests}); request '{requestId}' was rejected. Retry later.");
    }
}
