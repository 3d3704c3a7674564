using System.Runtime.InteropServices;

namespace LocalVllm.Engine.Core;

/// <summary>
/// Draft tokens for speculative decoding by prompt lookup (vLLM's <c>"ngram"</c> method): a sequence's last n tokens
/// (n from <c>maxN</c> down to <c>minN</c>) are looked for earlier in its own tokens, prompt and output, and the tokens
/// that followed the latest earlier occurrence are proposed as its next ones. No model runs: a proposal is a
/// vectorized search of the sequence. It pays where the output repeats what is already there (an agent quoting a tool
/// result, code edited in place, JSON echoing its input), and costs little elsewhere: no match, no draft.
/// </summary>
internal sealed class NgramProposer(int numSpeculativeTokens, int minN, int maxN, int maxModelLen, int? disableByBatchSize = null)
{
    /// <summary>Whether drafts are off for a step with <paramref name="running"/> sequences running (vLLM's disable_by_batch_size).</summary>
    public bool DisabledFor(int running) => running >= disableByBatchSize;

    /// <summary>
    /// Whether a sequence's next tokens can be checked against drafts in one step: nothing may make a position's choice
    /// depend on the tokens accepted before it in the same step (penalties, bad words, a structured-output constraint),
    /// nothing is reported per token (log-probabilities), and a sampled request must not be seeded (its tokens would
    /// then depend on whether the step had room for drafts, that is on what else ran: a seeded request gives the same
    /// tokens whatever shares its batch). Other sequences decode as usual.
    /// </summary>
    public static bool CanSpeculate(Sequence seq)
    {
        var p = seq.Sampling;
        // A structured-output constraint: only once it applies (not inside a reasoning section); drafts are then cut where
        // the grammar refuses them, and each row is checked (greedy) or drawn from (sampled) under the mask its drafts lead to.
        bool constraintOk = seq.Constraint is null || seq.Constraint is { Active: true, Dead: false };
        return (p.IsGreedy || p.Seed is null) && p.Logprobs is null && constraintOk && seq.BadWordIds is null
            && seq.NumOutputTokens >= p.MinTokens // before min_tokens, EOS and stop tokens are masked row by row
            && p.RepetitionPenalty == 1f && p.PresencePenalty == 0f && p.FrequencyPenalty == 0f
            && p.LogitBias is not { Count: > 0 } && p.AllowedTokenIds is not { Count: > 0 };
    }

    /// <summary>
    /// Up to <paramref name="limit"/> draft tokens for <paramref name="seq"/>, which has just sampled its last token (none
    /// when it cannot speculate or nothing matches). Never more than its token limit and the context leave room for
    /// after the token the step samples anyway.
    /// </summary>
    public int[]? Propose(Sequence seq, int limit)
    {
        if (!CanSpeculate(seq)) return null;
        limit = Math.Min(Math.Min(limit, numSpeculativeTokens),
            Math.Min(seq.Sampling.MaxTokens - seq.NumOutputTokens - 1, maxModelLen - seq.NumTokens - 1));
        if (limit <= 0) return null;
        var tokens = CollectionsMarshal.AsSpan(seq.TokenList);
        int length = tokens.Length;
        for (int n = Math.Min(maxN, length - 1); n >= minN; n--)
        {
            // The latest earlier occurrence of the last n tokens that has a token after it: searched in all but the last
            // token, so the suffix itself never matches.
            int at = tokens[..(length - 1)].LastIndexOf(tokens[(length - n)..]);
            if (at < 0) continue;
            int from = at + n, count = Math.Min(limit, length - from);
            var drafts = tokens.Slice(from, count).ToArray();
            return seq.Constraint is { } constraint ? AllowedPrefix(drafts, constraint) : drafts;
        }
        return null;
    }

    /// <summary>
    /// The drafts up to the first that the grammar refuses, that would end the sequence, or after which the grammar
    /// forces bytes (null when none is left). A plain run appends forced tokens after such a token instead of sampling
    /// the next (jump-forward), so no draft may follow it, and it may not be a draft itself: a draft is always followed
    /// by a token the step samples. Left for the step's own token, it is followed by jump-forward as in a plain run.
    /// </summary>
    private static int[]? AllowedPrefix(int[] drafts, Structured.SequenceConstraint constraint)
    {
        var matcher = constraint.Matcher.Clone();
        int keep = 0;
        while (keep < drafts.Length && !constraint.EndTokens.Contains(drafts[keep]) && matcher.TryAdvance(drafts[keep])
               && matcher.ForcedBytes(1).Length == 0)
            keep++;
        return keep == 0 ? null : drafts[..keep];
    }
}
