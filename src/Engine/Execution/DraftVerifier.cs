namespace LocalVllm.Engine.Execution;

/// <summary>
/// Speculative decoding's check of draft tokens against the model's distributions at their positions (row i: the
/// distribution after the last known token and the first i drafts). Greedy: a draft stands while it is the argmax.
/// Sampled: draft i stands with probability p_i(draft); the first that does not is replaced by a draw from p_i without
/// it (renormalized), and when every draft stands one more token is drawn from the last row. A draft is a single
/// proposed token (probability 1 under the proposer), so this is the rejection-sampling rule with the proposal's mass
/// on one token, and each position's token has exactly the model's distribution, as if sampled one step at a time.
/// </summary>
internal static class DraftVerifier
{
    /// <summary>Greedy: how many drafts stand, and the token after them (the argmax where the first one failed, or after the last).</summary>
    public static (int Accepted, int Next) Greedy(IReadOnlyList<int> argmax, IReadOnlyList<int> drafts) => Greedy(j => argmax[j], drafts);

    /// <summary>
    /// Greedy, with row j's choice computed when the check reaches it (after drafts 0 .. j-1 stood): a structured-output
    /// constraint's mask for row j depends on them. A choice of -1 means row j allows no token at all: the drafts before
    /// the last are kept and the last becomes the step's token, so the step gives what a plain run gives before it
    /// finds the dead end (one step later, as a plain run would).
    /// </summary>
    public static (int Accepted, int Next) Greedy(Func<int, int> choice, IReadOnlyList<int> drafts)
    {
        for (int j = 0; ; j++)
        {
            int c = choice(j);
            if (c < 0) return (j - 1, drafts[j - 1]); // never for row 0, whose choice always exists
            if (j == drafts.Count || drafts[j] != c) return (j, c);
        }
    }

    /// <summary>
    /// Sampled: <paramref name="probs"/>(i) gives row i's probabilities over the vocabulary (drafts.Count + 1 rows); a
    /// row is asked for only when the check reaches it, so a draft that fails early spares the rows after it.
    /// </summary>
    public static (int Accepted, int Next) Sampled(Func<int, float[]> probs, IReadOnlyList<int> drafts, Random random)
    {
        for (int i = 0; i < drafts.Count; i++)
        {
            var row = probs(i);
            double total = Sum(row), q = row[drafts[i]];
            if (random.NextDouble() * total < q) continue;
            return (i, Draw(row, random.NextDouble() * (total - q), skip: drafts[i]));
        }
        var last = probs(drafts.Count);
        return (drafts.Count, Draw(last, random.NextDouble() * Sum(last), skip: -1));
    }

    private static double Sum(float[] row)
    {
        double s = 0;
        foreach (var p in row) s += p;
        return s;
    }

    /// <summary>The token where the running sum of <paramref name="row"/> (without <paramref name="skip"/>) passes <paramref name="target"/>.</summary>
    private static int Draw(float[] row, double target, int skip)
    {
        double run = 0;
        int lastPositive = -1;
        for (int t = 0; t < row.Length; t++)
        {
            if (t == skip || row[t] <= 0) continue;
            lastPositive = t;
            run += row[t];
            if (run > target) return t;
        }
        return lastPositive; // rounding left the target at the very end
    }
}
