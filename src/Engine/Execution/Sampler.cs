using System.Runtime.Intrinsics;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Kernels.Cpu;
using TorchSharp;
using LocalVllm.Engine.Kernels;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Execution;

/// <summary>The token chosen for one row, with its log-probabilities when asked for.</summary>
public readonly record struct SampledToken(int TokenId, PositionLogprobs? Logprobs);

/// <summary>
/// Turns a step's logits into tokens, all rows in one pass: logit bias and penalties, then greedy rows by argmax and the others by
/// temperature, top-k, top-p and min-p (in that order, as Hugging Face applies them) and a draw from each sequence's
/// own random stream, so a seeded request samples the same tokens whatever else shares its batch.
/// Log-probabilities are those of the model's raw distribution.
/// </summary>
public sealed class Sampler
{
    // Scalars are passed to libtorch by handle; a temporary one (an implicit conversion) can be finalized by the GC
    // while the native call still reads it, which libtorch reports as a corrupt scalar ("toFloat"). Constants live
    // here for the process; per-call scalars are held by a using until the call returns.
    private static readonly Scalar NegativeInfinity = float.NegativeInfinity.ToScalar();
    private static readonly Scalar Zero = 0.ToScalar();

    /// <summary>Samples one token per row of <paramref name="logits"/> ([rows, vocab] float32) for <paramref name="seqs"/>.</summary>
    public SampledToken[] Sample(Tensor logits, IReadOnlyList<Sequence> seqs)
    {
        using var scope = NewDisposeScope();
        int rows = seqs.Count;
        var result = new SampledToken[rows];
        if (rows == 0) return result;

        Tensor? logprobs = seqs.Any(s => s.Sampling.Logprobs is not null) ? logits.log_softmax(-1) : null;
        var processed = ApplyPenalties(ApplyConstraints(logits, seqs), seqs);

        var greedyTokens = CpuArgMax.ArgMax(processed);
        var randomRows = Enumerable.Range(0, rows).Where(i => !seqs[i].Sampling.IsGreedy).ToArray();
        var chosen = new int[rows];
        for (int i = 0; i < rows; i++) chosen[i] = (int)greedyTokens[i];
        if (randomRows.Length > 0)
        {
            using var idx = tensor(randomRows.Select(r => (long)r).ToArray(), device: logits.device);
            var sub = processed.index_select(0, idx);
            var draws = randomRows.Select(r => seqs[r].Random.NextDouble()).ToArray();
            var picked = SampleRows(sub, randomRows.Select(r => seqs[r].Sampling).ToArray(), draws);
            for (int j = 0; j < randomRows.Length; j++) chosen[randomRows[j]] = picked[j];
        }

        for (int i = 0; i < rows; i++)
        {
            PositionLogprobs? lp = null;
            if (seqs[i].Sampling.Logprobs is int k && logprobs is not null)
                lp = Logprobs(logprobs[i], chosen[i], k);
            result[i] = new SampledToken(chosen[i], lp);
        }
        return result;
    }

    /// <summary>
    /// Temperature, top-k, top-p, min-p and a draw per row, computed in descending-probability order. Returns the
    /// chosen ids. Exposed for tests that check the filters against a direct computation.
    /// </summary>
    internal static int[] SampleRows(Tensor logits, SamplingParams[] ps, double[] uniforms)
    {
        using var scope = NewDisposeScope();
        var probs = FilteredProbabilities(logits, ps, out var order); // [rows, vocab] in sorted order
        var cum = probs.cumsum(-1);
        var total = cum.narrow(1, cum.shape[1] - 1, 1);
        var u = tensor(uniforms.Select(x => (float)x).ToArray(), device: logits.device).unsqueeze(1) * total;
        using var last = (cum.shape[1] - 1).ToScalar();
        var pos = searchsorted(cum, u, right: true).clamp_max(last);
        var ids = order.gather(1, pos).squeeze(1).data<long>().ToArray();
        return ids.Select(x => (int)x).ToArray();
    }

    /// <summary>Per-row probabilities after the filters, in descending order of logit; <paramref name="order"/> maps back to token ids.</summary>
    internal static Tensor FilteredProbabilities(Tensor logits, SamplingParams[] ps, out Tensor order)
    {
        int rows = ps.Length;
        long vocab = logits.shape[1];
        var temps = tensor(ps.Select(p => p.Temperature).ToArray(), device: logits.device).unsqueeze(1);
        var scaled = logits / temps;
        var (vals, idx) = scaled.sort(-1, descending: true);
        order = idx;
        var positions = arange(vocab, device: logits.device).unsqueeze(0); // [1, vocab]

        var topK = tensor(ps.Select(p => p.TopK > 0 ? (long)Math.Min(p.TopK, vocab) : vocab).ToArray(), device: logits.device).unsqueeze(1);
        var masked = vals.masked_fill(positions >= topK, NegativeInfinity);

        var topP = tensor(ps.Select(p => p.TopP).ToArray(), device: logits.device).unsqueeze(1);
        var p1 = masked.softmax(-1);
        var before = p1.cumsum(-1) - p1; // mass of strictly more likely tokens
        masked = masked.masked_fill((before > topP).logical_and(positions > Zero), NegativeInfinity);

        var minP = tensor(ps.Select(p => p.MinP).ToArray(), device: logits.device).unsqueeze(1);
        var p2 = masked.softmax(-1);
        masked = masked.masked_fill(p2 < p2.narrow(1, 0, 1) * minP, NegativeInfinity);
        return masked.softmax(-1);
    }

    /// <summary>
    /// Structured outputs: for each row whose sequence has an active constraint, every token the matcher does not allow
    /// becomes -inf (on a copy), before penalties and every sampling step, so greedy and seeded draws see only allowed
    /// tokens. End tokens (EOS, stop tokens) are allowed where the match is complete and MinTokens is met. A row with no
    /// allowed token at all is left as it is and its constraint marked dead (the request then fails with that reason).
    /// </summary>
    internal static Tensor ApplyConstraints(Tensor logits, IReadOnlyList<Sequence> seqs)
    {
        List<int>? rows = null;
        for (int i = 0; i < seqs.Count; i++)
            if (seqs[i].Constraint is { Active: true }) (rows ??= []).Add(i);
        if (rows is null) return logits;
        int vocab = (int)logits.shape[1];
        int wordCount = Math.Max((vocab + 63) / 64, seqs[rows[0]].Constraint!.Matcher.Vocabulary.Words);
        var words = t_words is { Length: var held } && held == wordCount ? t_words : t_words = new ulong[wordCount];
        Tensor? masked = null;
        // One reused bias row (0 or -inf, added in place): no per-step large arrays for the GC to chase.
        var bias = t_bias is { Length: var n } && n == vocab ? t_bias : t_bias = new float[vocab];
        foreach (int i in rows)
        {
            var c = seqs[i].Constraint!;
            c.FillAllowed(c.Matcher, words, seqs[i].NumOutputTokens >= seqs[i].Sampling.MinTokens, vocab);
            bool any = false;
            foreach (ulong w in words)
                if (w != 0) { any = true; break; }
            if (!any) { c.Dead = true; continue; }
            masked ??= logits.clone();
            if (masked.device_type == TorchSharp.DeviceType.CPU && masked.dtype == ScalarType.Float32 && masked.is_contiguous())
            {
                MaskRowInPlace(masked, i, vocab, words);
                continue;
            }
            for (int t = 0; t < vocab; t++) bias[t] = (words[t >> 6] & (1UL << t)) == 0 ? float.NegativeInfinity : 0f;
            using var biasRow = tensor(bias, device: logits.device);
            using var typed = biasRow.to_type(logits.dtype);
            using var row = masked[i];
            HeldScalars.AddInPlace(row, typed);
        }
        return masked ?? logits;
    }

    /// <summary>
    /// Row <paramref name="row"/> of float32 CPU logits set to -inf wherever <paramref name="words"/> has no bit, in
    /// place and a 64-token word at a time: words that allow everything (most of a mask inside a string) are skipped and
    /// words that allow nothing are filled, so a row costs a few thousand word tests instead of a pass over every id
    /// and a bias tensor.
    /// </summary>
    private static unsafe void MaskRowInPlace(Tensor logits, int row, int vocab, ulong[] words)
    {
        float* p = Kernels.Cpu.Simd.Pointer(logits) + (long)row * vocab;
        for (int w = 0, start = 0; start < vocab; w++, start += 64)
        {
            ulong bits = words[w];
            if (bits == ulong.MaxValue) continue;
            int count = Math.Min(64, vocab - start);
            if (bits == 0)
            {
                new Span<float>(p + start, count).Fill(float.NegativeInfinity);
                continue;
            }
            for (int j = 0; j < count; j++)
                if ((bits & (1UL << j)) == 0) p[start + j] = float.NegativeInfinity;
        }
    }

    [ThreadStatic] private static float[]? t_bias;
    [ThreadStatic] private static ulong[]? t_words;

    /// <summary>
    /// The allowed-token mask, min_tokens (EOS and stop token ids cannot be sampled before it), logit bias, then
    /// repetition (prompt and output), presence and frequency (output) penalties, applied to a copy.
    /// </summary>
    internal static Tensor ApplyPenalties(Tensor logits, IReadOnlyList<Sequence> seqs)
    {
        Tensor? result = null;
        long vocab = logits.shape[1];
        for (int i = 0; i < seqs.Count; i++)
        {
            var p = seqs[i].Sampling;
            bool rep = p.RepetitionPenalty != 1f, pres = p.PresencePenalty != 0f, freq = p.FrequencyPenalty != 0f, bias = p.LogitBias is { Count: > 0 };
            bool allowed = p.AllowedTokenIds is { Count: > 0 };
            var banned = seqs[i].BadWordIds is { } badWords ? BannedNext(badWords, seqs[i].OutputTokens()) : null;
            if (seqs[i].MinTokensStopIds is { Length: > 0 } stops && seqs[i].NumOutputTokens < p.MinTokens)
                (banned ??= []).AddRange(stops.Where(t => t < vocab));
            if (!rep && !pres && !freq && !bias && !allowed && banned is null) continue;
            result ??= logits.clone();
            using var row = result[i];
            if (allowed)
            {
                using var ids = tensor(p.AllowedTokenIds!.Select(t => (long)t).ToArray(), device: logits.device);
                using var keep = row.index_select(0, ids);
                row.fill_(NegativeInfinity);
                row.index_copy_(0, ids, keep);
            }
            if (banned is not null)
            {
                using var ids = tensor(banned.Select(t => (long)t).ToArray(), device: logits.device);
                row.index_fill_(0, ids, NegativeInfinity);
            }
            if (bias)
            {
                var pairs = p.LogitBias!.ToArray(); // one pass: ids and biases in the same order whatever the dictionary
                using var ids = tensor(pairs.Select(kv => (long)kv.Key).ToArray(), device: logits.device);
                using var add = tensor(pairs.Select(kv => kv.Value).ToArray(), device: logits.device);
                using var v = row.index_select(0, ids);
                using var biased = v + add;
                row.index_copy_(0, ids, biased);
            }
            if (rep)
            {
                using var seen = tensor(seqs[i].Tokens.Distinct().Select(t => (long)t).ToArray(), device: logits.device);
                using var v = row.index_select(0, seen);
                using var penalty = p.RepetitionPenalty.ToScalar();
                using var penalized = where(v > Zero, v / penalty, v * penalty);
                row.index_copy_(0, seen, penalized);
            }
            if ((pres || freq) && seqs[i].NumOutputTokens > 0)
            {
                var counts = seqs[i].OutputTokenIds.GroupBy(t => t).ToArray();
                using var ids = tensor(counts.Select(g => (long)g.Key).ToArray(), device: logits.device);
                using var delta = tensor(counts.Select(g => p.FrequencyPenalty * g.Count() + p.PresencePenalty).ToArray(), device: logits.device);
                using var v = row.index_select(0, ids);
                using var updated = v - delta;
                row.index_copy_(0, ids, updated);
            }
        }
        return result ?? logits;
    }

    /// <summary>
    /// The tokens a bad word forbids next: the last token of each form whose earlier tokens end the output (all of a
    /// one-token form). Null when none.
    /// </summary>
    internal static List<int>? BannedNext(int[][] badWords, IReadOnlyList<int> output)
    {
        List<int>? banned = null;
        foreach (var word in badWords)
        {
            int prefix = word.Length - 1;
            if (prefix > output.Count) continue;
            bool match = true;
            for (int j = 0; j < prefix && match; j++) match = output[output.Count - prefix + j] == word[j];
            if (match) (banned ??= []).Add(word[^1]);
        }
        return banned;
    }

    /// <summary>The log-probability of <paramref name="token"/> in <paramref name="row"/> ([vocab] log-softmax), its rank and the top-k.</summary>
    internal static PositionLogprobs Logprobs(Tensor row, int token, int k)
    {
        using var scope = NewDisposeScope();
        float chosen = row[token].item<float>();
        using var chosenScalar = chosen.ToScalar();
        int rank = (int)(row > chosenScalar).sum().item<long>() + 1;
        var top = new List<TokenLogprob>(k);
        if (k > 0)
        {
            var (vals, ids) = row.topk(k);
            var v = vals.data<float>().ToArray();
            var t = ids.data<long>().ToArray();
            for (int j = 0; j < k; j++) top.Add(new TokenLogprob((int)t[j], v[j], j + 1));
        }
        return new PositionLogprobs(token, chosen, rank, top);
    }
}
