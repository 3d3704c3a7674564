namespace LocalVllm.Engine;

/// <summary>
/// Beam search settings, as vLLM's <c>BeamSearchParams</c>: <see cref="BeamWidth"/> beams per prompt, each step
/// extending every beam by its <c>2 x BeamWidth</c> most likely next tokens (the model's raw log-probabilities) and
/// keeping the <see cref="BeamWidth"/> extensions with the highest cumulative log-probability; a beam that reaches
/// EOS is set aside as finished. At the end, finished and running beams are ranked by
/// <c>cumulative log-probability / length ^ LengthPenalty</c> (length: prompt and output tokens, an ending EOS not counted).
/// </summary>
public sealed record BeamSearchParams
{
    /// <summary>Beams kept per prompt, and sequences returned per prompt.</summary>
    public required int BeamWidth { get; init; }
    /// <summary>Most tokens generated per beam.</summary>
    public int MaxTokens { get; init; } = 16;
    /// <summary>Keep extending beams past EOS (EOS is then an ordinary token).</summary>
    public bool IgnoreEos { get; init; }
    /// <summary>
    /// Temperature of each step's one sampled token, which joins the candidates when it is not among the most likely
    /// (as in vLLM); 0 (the default) samples the most likely, so the candidates are exactly the top <c>2 x BeamWidth</c>.
    /// </summary>
    public float Temperature { get; init; }
    /// <summary>Keep a stopped beam's EOS token in its <see cref="BeamSearchSequence.TokenIds"/> and text (as vLLM's <c>include_stop_str_in_output</c>).</summary>
    public bool IncludeStopStrInOutput { get; init; }
    /// <summary>Exponent of the length that divides the cumulative log-probability in the final ranking; 0 ranks by log-probability alone.</summary>
    public double LengthPenalty { get; init; } = 1.0;

    /// <summary>Throws an <see cref="ArgumentException"/> naming the first invalid setting.</summary>
    public void Validate(int maxLogprobs)
    {
        if (BeamWidth < 1) throw new ArgumentException($"BeamWidth must be at least 1, got {BeamWidth}.", nameof(BeamWidth));
        if (2 * BeamWidth > maxLogprobs)
            throw new ArgumentException($"BeamWidth {BeamWidth} needs {2 * BeamWidth} log-probabilities per step, more than the engine's limit of {maxLogprobs} " +
                                        "(EngineOptions.MaxLogprobs, --max-logprobs).", nameof(BeamWidth));
        if (MaxTokens < 1) throw new ArgumentException($"MaxTokens must be at least 1, got {MaxTokens}.", nameof(MaxTokens));
        if (!(Temperature >= 0) || float.IsInfinity(Temperature)) throw new ArgumentException($"Temperature must be a finite number >= 0, got {Temperature}.", nameof(Temperature));
        if (!double.IsFinite(LengthPenalty)) throw new ArgumentException($"LengthPenalty must be a finite number, got {LengthPenalty}.", nameof(LengthPenalty));
    }
}

/// <summary>One beam of a finished search.</summary>
/// <param name="TokenIds">The generated tokens; a stopped beam's EOS only with <see cref="BeamSearchParams.IncludeStopStrInOutput"/>.</param>
/// <param name="Text">The generated tokens as text, special tokens skipped (empty without a tokenizer).</param>
/// <param name="CumulativeLogprob">The sum of the generated tokens' log-probabilities (a stopped beam's EOS included).</param>
/// <param name="Score">The ranking score: <c>CumulativeLogprob / length ^ LengthPenalty</c>.</param>
/// <param name="FinishReason"><c>stop</c> (EOS) or <c>length</c> (MaxTokens, or the context is full).</param>
public sealed record BeamSearchSequence(IReadOnlyList<int> TokenIds, string Text, double CumulativeLogprob, double Score, string FinishReason);

/// <summary>A prompt's best <see cref="BeamSearchParams.BeamWidth"/> beams, best first.</summary>
/// <param name="Prompt">The prompt's text, when it was given as text.</param>
/// <param name="PromptTokenIds">The prompt's token ids.</param>
/// <param name="Sequences">The best beams, best first.</param>
/// <param name="NumCachedTokens">The prompt's tokens the prefix cache served at the search's first step.</param>
public sealed record BeamSearchOutput(string? Prompt, IReadOnlyList<int> PromptTokenIds, IReadOnlyList<BeamSearchSequence> Sequences, int NumCachedTokens);

/// <summary>
/// The search itself, on top of whatever runs one-token requests (the offline <see cref="Llm"/> or the
/// <see cref="AsyncLlmEngine"/>), as vLLM runs it: each step sends every live beam as a prompt of its own for one token
/// with its top log-probabilities, so that the prefix cache serves the beams' shared tokens and only each beam's last
/// partial block is computed again.
/// </summary>
internal static class BeamSearcher
{
    private sealed record Beam(int[] Tokens, int Generated, double Cumulative, string? FinishReason);

    /// <summary>Searches every prompt at once: each step's one-token requests of all prompts' beams go to <paramref name="expand"/> together.</summary>
    /// <param name="prompts">Token ids, and the text they came from (when they did).</param>
    /// <param name="p">The search's settings, already validated.</param>
    /// <param name="eos">The tokens that end a beam (unless <see cref="BeamSearchParams.IgnoreEos"/>).</param>
    /// <param name="maxLength">A beam this long ends: the context length, or the whole KV cache when it holds less.</param>
    /// <param name="decode">Turns generated ids into text; null without a tokenizer.</param>
    /// <param name="expand">Runs one request per prompt with the given sampling, outputs in prompt order.</param>
    public static async Task<IReadOnlyList<BeamSearchOutput>> RunAsync(IReadOnlyList<(IReadOnlyList<int> Ids, string? Text)> prompts, BeamSearchParams p,
        IReadOnlySet<int> eos, int maxLength, Func<int[], string>? decode,
        Func<IReadOnlyList<int[]>, SamplingParams, Task<IReadOnlyList<RequestOutput>>> expand)
    {
        int width = p.BeamWidth;
        var step = new SamplingParams { Temperature = p.Temperature, MaxTokens = 1, Logprobs = 2 * width, IgnoreEos = true };
        var live = prompts.Select(x => new List<Beam> { new(x.Ids.ToArray(), 0, 0, null) }).ToArray();
        var finished = prompts.Select(_ => new List<Beam>()).ToArray();
        var cached = new int[prompts.Count];
        for (int t = 0; t < p.MaxTokens; t++)
        {
            // A beam that fills the context cannot grow: it ends here, as at MaxTokens.
            for (int i = 0; i < live.Length; i++)
            {
                finished[i].AddRange(live[i].Where(b => b.Tokens.Length >= maxLength).Select(b => b with { FinishReason = FinishReasons.Length }));
                live[i].RemoveAll(b => b.Tokens.Length >= maxLength);
            }
            var beams = live.SelectMany((list, i) => list.Select(b => (Prompt: i, Beam: b))).ToList();
            if (beams.Count == 0) break;
            var outputs = await expand(beams.Select(b => b.Beam.Tokens).ToArray(), step).ConfigureAwait(false);
            if (t == 0)
                for (int j = 0; j < beams.Count; j++) cached[beams[j].Prompt] = outputs[j].NumCachedTokens;

            var candidates = live.Select(_ => new List<Beam>()).ToArray();
            for (int j = 0; j < beams.Count; j++)
            {
                var (i, beam) = beams[j];
                var position = outputs[j].Outputs[0].Logprobs![0];
                // The most likely tokens, and the sampled one when it is not among them.
                var next = position.Top.Select(x => (x.TokenId, x.Logprob)).ToList();
                if (!next.Any(x => x.TokenId == position.TokenId)) next.Add((position.TokenId, position.Logprob));
                foreach (var (token, logprob) in next)
                {
                    var extended = new Beam([.. beam.Tokens, token], beam.Generated + 1, beam.Cumulative + logprob, null);
                    if (!p.IgnoreEos && eos.Contains(token)) finished[i].Add(extended with { FinishReason = FinishReasons.Stop });
                    else candidates[i].Add(extended);
                }
            }
            for (int i = 0; i < live.Length; i++)
                live[i] = candidates[i].OrderByDescending(b => b.Cumulative).Take(width).ToList();
        }

        var results = new BeamSearchOutput[prompts.Count];
        for (int i = 0; i < prompts.Count; i++)
        {
            var all = finished[i].Concat(live[i].Select(b => b with { FinishReason = b.FinishReason ?? FinishReasons.Length }));
            var best = all.Select(b => (Beam: b, Score: Score(b, eos, p))).OrderByDescending(x => x.Score).Take(width)
                .Select(x =>
                {
                    var generated = x.Beam.Tokens[^x.Beam.Generated..];
                    if (x.Beam.FinishReason == FinishReasons.Stop && !p.IncludeStopStrInOutput) generated = generated[..^1];
                    return new BeamSearchSequence(generated, decode?.Invoke(generated) ?? "", x.Beam.Cumulative, x.Score, x.Beam.FinishReason!);
                }).ToArray();
            results[i] = new BeamSearchOutput(prompts[i].Text, prompts[i].Ids, best, cached[i]);
        }
        return results;
    }

    /// <summary>vLLM's ranking: cumulative log-probability over the length (prompt and output, an ending EOS not counted) to the length penalty.</summary>
    private static double Score(Beam b, IReadOnlySet<int> eos, BeamSearchParams p)
    {
        int length = b.Tokens.Length;
        if (b.Generated > 0 && eos.Contains(b.Tokens[^1])) length--;
        return b.Cumulative / Math.Pow(length, p.LengthPenalty);
    }
}
