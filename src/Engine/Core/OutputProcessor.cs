using System.Diagnostics;
using LocalVllm.Engine.Diagnostics;
using LocalVllm.Engine.Execution;
using LocalVllm.Engine.Structured;
using LocalVllm.Engine.Text.Tokenization;
using Microsoft.Extensions.Logging;

namespace LocalVllm.Engine.Core;

/// <summary>
/// The requests in flight and everything that happens to a sampled token after the scheduler has appended it: the
/// sequence's timings and log-probabilities, incremental detokenization, stop checks (stop strings, a custom stop
/// condition, EOS and stop tokens, MaxTokens, the context length) and the <see cref="RequestOutput"/>s of the step in
/// each request's <see cref="RequestOutputKind"/>. A delta output costs the same at the end of a long generation as at
/// its start: it touches only the new tokens and text. Finishing a sequence goes through the scheduler, which frees
/// its blocks. Owned by the engine thread.
/// </summary>
internal sealed class OutputProcessor(Scheduler scheduler, ModelTokenizer? tokenizer, IReadOnlySet<int> eos, int maxModelLen, EngineCounters counters, ILogger logger,
    Func<TokenVocabulary>? vocabulary = null, bool jumpForward = true, int streamInterval = 1, int? seed = null)
{
    // The engine's seed (vLLM's --seed): unseeded requests' random streams are drawn from it in arrival order, so the same
    // requests in the same order sample the same tokens from one run to the next. Without it, each is seeded at random.
    private readonly Random? _seeds = seed is int s ? new Random(s) : null;
    private readonly Dictionary<string, Request> _requests = [];
    private Func<string, int[]>? _encode; // the tokenizer's encoding for jump-forward, one delegate for all tokens

    /// <summary>Requests not yet finished.</summary>
    public int Count => _requests.Count;

    public bool Contains(string requestId) => _requests.ContainsKey(requestId);

    /// <summary>Takes a validated request: one sequence per completion, queued in the scheduler.</summary>
    public void Add(string requestId, IReadOnlyList<int> promptTokenIds, SamplingParams sampling, string? prompt, DateTimeOffset? deadline, Lora.LoraAdapter? lora = null)
    {
        var ids = promptTokenIds.ToArray();
        long now = Stopwatch.GetTimestamp();
        CompiledGrammar? grammar = null;
        TokenVocabulary? vocab = null;
        // The tokens that end a sequence: a constraint allows them only where its match is complete, and min_tokens (as
        // vLLM applies it) keeps them from being sampled until that many tokens are out.
        int[] endTokens = [.. (sampling.IgnoreEos ? Enumerable.Empty<int>() : eos).Concat(sampling.StopTokenIds).Distinct()];
        if (sampling.StructuredOutputs is { } constraint)
        {
            vocab = vocabulary?.Invoke() ?? throw new ArgumentException("StructuredOutputs needs the model's tokenizer, and this model directory has none.", nameof(sampling));
            grammar = ConstraintCompiler.Compile(constraint);
        }
        int[][]? badWords = null;
        if (sampling.BadWords.Count > 0)
        {
            if (tokenizer is null) throw new ArgumentException("BadWords (bad_words) needs the model's tokenizer, and this model directory has none.", nameof(sampling));
            // Each word as it stands and after a space (mid-text), as vLLM tokenizes them; duplicates dropped.
            badWords = sampling.BadWords.SelectMany(w => new[] { w.TrimStart(), " " + w.TrimStart() })
                .Select(w => tokenizer.Encode(w, addSpecialTokens: false)).Where(t => t.Length > 0)
                .DistinctBy(t => string.Join(",", t)).ToArray();
        }
        int[]? minTokensStop = sampling.MinTokens > 0 ? endTokens : null;
        var seqs = new Sequence[sampling.N];
        for (int i = 0; i < seqs.Length; i++)
        {
            var s = seqs[i] = new Sequence(requestId, i, ids, sampling, now, _seeds?.NextInt64()) { BadWordIds = badWords, MinTokensStopIds = minTokensStop, Lora = lora };
            if (sampling.PromptLogprobs is not null) s.PromptLogprobs = new PositionLogprobs?[ids.Length];
            if (sampling.Logprobs is not null) s.OutputLogprobs = [];
            if (tokenizer is not null) s.Detokenizer = new IncrementalDetokenizer(tokenizer, ids, sampling.SkipSpecialTokens, sampling.Stop, sampling.IncludeStopStrInOutput);
            if (grammar is not null) s.Constraint = new SequenceConstraint(new GrammarMatcher(grammar, vocab!), endTokens, sampling.StructuredOutputs!.ReasoningEnd);
        }
        _requests[requestId] = new Request(requestId, prompt, ids, sampling, seqs, deadline);
        foreach (var s in seqs) scheduler.Add(s);
    }

    /// <summary>Ends a request's unfinished sequences with finish reason "abort"; returns its final output, or null if unknown.</summary>
    public RequestOutput? Abort(string requestId)
    {
        if (!_requests.Remove(requestId, out var request)) return null;
        FinishAll(request, FinishReasons.Abort);
        return BuildOutput(request);
    }

    /// <summary>Ends the requests whose deadline has passed (finish reason "timeout").</summary>
    public List<RequestOutput> ExpireDeadlines()
    {
        var outputs = new List<RequestOutput>();
        var now = DateTimeOffset.UtcNow;
        foreach (var r in _requests.Values.Where(r => r.Deadline is { } d && d <= now).ToArray())
        {
            FinishAll(r, FinishReasons.Timeout);
            _requests.Remove(r.Id);
            EngineLog.Failed(logger, r.Id, $"deadline {r.Deadline:O} passed");
            outputs.Add(BuildOutput(r));
        }
        return outputs;
    }

    /// <summary>A sequence that cannot be scheduled even alone (it outgrew the whole cache) ends with "length".</summary>
    public IEnumerable<RequestOutput> FinishStuck(Sequence seq)
    {
        scheduler.Finish(seq, FinishReasons.Length);
        return Collect([seq]);
    }

    /// <summary>The forward pass or the sampler failed: the step's requests fail with the cause; the others carry on.</summary>
    public List<RequestOutput> FailStep(IReadOnlyList<ScheduledSequence> batch, Exception e) =>
        batch.Select(b => b.Sequence.RequestId).Distinct().ToArray()
            .Select(id => Fail(id, new EngineStepException($"Request '{id}' failed in the engine step: {e.Message}", e))).ToList();

    /// <summary>
    /// Processes one step's results after the scheduler appended the sampled tokens: prompt log-probabilities,
    /// timings, detokenization and stop checks; returns an output for every request that progressed (as its output
    /// kind says).
    /// </summary>
    public List<RequestOutput> Process(IReadOnlyList<ScheduledSequence> batch, ModelRunnerOutput result)
    {
        var outputs = new List<RequestOutput>();
        var touched = new List<Sequence>();
        long now = Stopwatch.GetTimestamp();
        for (int i = 0; i < batch.Count; i++)
        {
            var seq = batch[i].Sequence;
            if (result.PromptLogprobs[i] is { } chunk) chunk.Values.CopyTo(seq.PromptLogprobs!, chunk.FirstPosition);
            if (result.Sampled[i] is not { } token) continue;
            if (seq.FirstTokenTicks is null)
            {
                seq.FirstTokenTicks = now;
                EngineMetrics.TimeToFirstToken.Record(Stopwatch.GetElapsedTime(seq.ArrivalTicks, now).TotalSeconds);
            }
            else if (seq.LastTokenTicks is long previous)
                EngineMetrics.TimePerOutputToken.Record(Stopwatch.GetElapsedTime(previous, now).TotalSeconds);
            seq.LastTokenTicks = now;
            if (token.Logprobs is not null) seq.OutputLogprobs!.Add(token.Logprobs);
            try
            {
                if (result.AcceptedDrafts?[i] is { Count: > 0 } drafts)
                {
                    // Speculative decoding appended the accepted drafts and then the sampled token: each goes through the
                    // stop checks in order, and a stop among them drops the tokens after it (a plain run never made them).
                    int first = seq.NumTokens - drafts.Count - 1;
                    for (int k = first; k < seq.NumTokens; k++) // a stop truncates the tokens after it, which ends the loop
                    {
                        CheckStop(seq, seq.Tokens[k], k + 1);
                        if (seq.Status == SequenceStatus.Finished) seq.TruncateTo(k + 1);
                    }
                    JumpForward(seq, seq.Tokens[^1]); // what a constraint forces after the step's last token, as after a plain step
                }
                else
                {
                    CheckStop(seq, token.TokenId, seq.NumTokens);
                    JumpForward(seq, token.TokenId);
                }
                touched.Add(seq);
            }
            catch (Exception e)
            {
                // A failure in one request's own processing (detokenizer, stop condition) fails that request only.
                outputs.Add(Fail(seq.RequestId, new RequestFailedException($"Request '{seq.RequestId}' failed while processing its output: {e.Message}", e)));
            }
        }
        outputs.AddRange(Collect(touched));
        return outputs;
    }

    /// <summary>
    /// Appends the tokens a structured-output constraint forces after <paramref name="token"/> (see
    /// <see cref="SequenceConstraint.ForcedTokens"/>) without sampling them: the next step computes their K/V as one
    /// chunk and samples after them, so a key name or a run of closing brackets costs one position instead of one step
    /// per token. Each goes through the same checks as a sampled token (constraint, stop strings, MaxTokens). Not when
    /// log-probabilities are asked for (forced tokens have no distribution to report).
    /// </summary>
    private void JumpForward(Sequence seq, int token)
    {
        if (!jumpForward || tokenizer is null || seq.Status == SequenceStatus.Finished || seq.Sampling.Logprobs is not null
            || seq.Constraint is not { Active: true } constraint)
            return;
        foreach (int forced in constraint.ForcedTokens(token, _encode ??= text => tokenizer.Encode(text, addSpecialTokens: false)))
        {
            seq.Append(forced);
            counters.JumpForwardTokens++;
            CheckStop(seq, forced, seq.NumTokens);
            if (seq.Status == SequenceStatus.Finished) return;
        }
    }

    /// <summary>The stop checks for <paramref name="token"/>, the last of the sequence's first <paramref name="numTokens"/> tokens.</summary>
    private void CheckStop(Sequence seq, int token, int numTokens)
    {
        var p = seq.Sampling;
        int generated = numTokens - seq.NumPromptTokens;
        if (seq.Constraint is { } constraint)
        {
            if (constraint.Dead)
                throw new InvalidOperationException($"the structured-output constraint allows no token after {generated - 1} output tokens (no token of the vocabulary can continue the match)");
            if (!constraint.Accept(token))
                throw new InvalidOperationException($"token {token} at output position {generated - 1} is not allowed by the structured-output constraint");
        }
        // A token that ends the sequence (EOS, a stop token id) is kept in the token ids but, as vLLM does, left out of
        // the text unless IncludeStopStrInOutput asks for it.
        bool stopToken = generated >= p.MinTokens && ((!p.IgnoreEos && eos.Contains(token)) || p.StopTokenIds.Contains(token));
        if (seq.Detokenizer is { } detok && (!stopToken || p.IncludeStopStrInOutput))
        {
            detok.Add(token);
            if (detok.MatchedStop is string matched) { scheduler.Finish(seq, FinishReasons.Stop, matched); return; }
            if (p.StopCondition is { } stop && stop(detok.Text)) { scheduler.Finish(seq, FinishReasons.Stop, "StopCondition"); return; }
        }
        if (stopToken) { scheduler.Finish(seq, FinishReasons.Stop, token); return; }
        if (seq.Constraint is { Active: true } c && c.Matcher.IsTerminated) { scheduler.Finish(seq, FinishReasons.Stop); return; }
        if (generated >= p.MaxTokens || numTokens >= maxModelLen) scheduler.Finish(seq, FinishReasons.Length);
    }

    private RequestOutput Fail(string requestId, Exception error)
    {
        var r = _requests[requestId];
        r.Error = error;
        FinishAll(r, FinishReasons.Error);
        _requests.Remove(requestId);
        EngineLog.Failed(logger, requestId, error.Message);
        return BuildOutput(r);
    }

    private void FinishAll(Request r, string reason)
    {
        foreach (var s in r.Sequences)
            if (s.Status != SequenceStatus.Finished) scheduler.Finish(s, reason);
    }

    private IEnumerable<RequestOutput> Collect(List<Sequence> touched)
    {
        foreach (var id in touched.Select(s => s.RequestId).Distinct())
        {
            if (!_requests.TryGetValue(id, out var request)) continue;
            bool finished = request.Finished;
            if (finished)
            {
                _requests.Remove(id);
                counters.FinishedRequests++;
                EngineMetrics.RecordFinished(request);
            }
            else if (request.Sampling.OutputKind == RequestOutputKind.FinalOnly || (streamInterval > 1 && !DueForOutput(request))) continue;
            yield return BuildOutput(request);
        }
    }

    /// <summary>
    /// Whether an unfinished request's output goes out this step under a stream interval: when a completion has its
    /// first tokens, has gathered <c>streamInterval</c> tokens since its last output, or has finished (one of n).
    /// </summary>
    private bool DueForOutput(Request r)
    {
        foreach (var s in r.Sequences)
        {
            int unsent = s.NumOutputTokens - s.NumOutputTokensSent;
            if ((s.NumOutputTokensSent == 0 && unsent > 0) || unsent >= streamInterval || (s.Status == SequenceStatus.Finished && !s.FinishSent))
                return true;
        }
        return false;
    }

    /// <summary>The request's output: what is new since its last output (delta), else everything so far.</summary>
    private static RequestOutput BuildOutput(Request r)
    {
        bool delta = r.Sampling.OutputKind == RequestOutputKind.Delta;
        var completions = new List<CompletionOutput>(r.Sequences.Length);
        foreach (var s in r.Sequences)
        {
            bool finished = s.Status == SequenceStatus.Finished;
            if (finished) s.Detokenizer?.Flush();
            // Delta: only what this completion produced since the request's last output; cumulative: everything.
            int from = delta ? s.NumOutputTokensSent : 0;
            if (delta && s.NumOutputTokensSent == s.NumOutputTokens && (!finished || s.FinishSent)) continue; // nothing new for this completion
            s.NumOutputTokensSent = s.NumOutputTokens;
            s.FinishSent = finished;
            completions.Add(new CompletionOutput
            {
                Index = s.Index,
                Text = s.Detokenizer is not { } detok ? "" : delta ? detok.TakeDelta() : detok.Text,
                TokenIds = s.OutputTokens(from),
                Logprobs = s.OutputLogprobs?.GetRange(from, s.OutputLogprobs.Count - from),
                FinishReason = s.FinishReason,
                StopReason = s.StopReason,
            });
        }
        var first = r.Sequences.Where(s => s.FirstTokenTicks is not null).Select(s => s.FirstTokenTicks!.Value).DefaultIfEmpty().Min();
        return new RequestOutput
        {
            RequestId = r.Id,
            Prompt = r.Prompt,
            PromptTokenIds = r.PromptIds,
            PromptLogprobs = r.Sequences[0].PromptLogprobs,
            Outputs = completions,
            Finished = r.Finished,
            Error = r.Error,
            NumCachedTokens = r.Sequences.Max(s => s.NumCachedPromptTokens),
            TimeToFirstTokenSeconds = first == 0 ? null : Stopwatch.GetElapsedTime(r.Sequences[0].ArrivalTicks, first).TotalSeconds,
            TimePerOutputTokenSeconds = r.Sequences[0] is { NumOutputTokens: > 1, FirstTokenTicks: long f0, LastTokenTicks: long l0 } s0
                ? Stopwatch.GetElapsedTime(f0, l0).TotalSeconds / (s0.NumOutputTokens - 1) : null,
        };
    }
}
