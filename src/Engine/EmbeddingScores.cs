namespace LocalVllm.Engine;

/// <summary>How two embeddings score against each other, as vLLM scores texts with an embedding model: their cosine.</summary>
public static class EmbeddingScores
{
    /// <summary>The cosine similarity of <paramref name="a"/> and <paramref name="b"/> (in double), in [-1, 1].</summary>
    public static double Cosine(ReadOnlySpan<float> a, ReadOnlySpan<float> b)
    {
        if (a.Length != b.Length) throw new ArgumentException($"Embeddings of {a.Length} and {b.Length} dimensions cannot be compared.", nameof(b));
        double dot = 0, na = 0, nb = 0;
        for (int i = 0; i < a.Length; i++)
        {
            dot += (double)a[i] * b[i];
            na += (double)a[i] * a[i];
            nb += (double)b[i] * b[i];
        }
        return na == 0 || nb == 0 ? 0 : dot / Math.Sqrt(na * nb);
    }

    /// <summary>
    /// The scores of the first <paramref name="firstCount"/> vectors against the rest (vLLM's <c>text_1</c> and
    /// <c>text_2</c>): one first vector against every other, or pairwise when the counts are equal; otherwise an
    /// <see cref="ArgumentException"/>.
    /// </summary>
    public static double[] Pairs(float[][] vectors, int firstCount)
    {
        int secondCount = vectors.Length - firstCount;
        if (firstCount != 1 && firstCount != secondCount)
            throw new ArgumentException($"{firstCount} first texts and {secondCount} second texts: give one first text for all, or as many as the second (scored pairwise).");
        return [.. Enumerable.Range(0, secondCount).Select(i => Cosine(vectors[firstCount == 1 ? 0 : i], vectors[firstCount + i]))];
    }
}
