using LocalVllm.Engine.Loading;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Embeddings (final hidden states, pooled): through the model's own output matrix they give Hugging Face's reference
/// logits (last token) and the mean of the engine's per-position logits (mean pooling, by linearity); normalized ones
/// have unit length; requests running beside them are not disturbed and no block is left behind.
/// </summary>
[Trait("Category", "Fixtures")]
public sealed class EmbeddingTests
{
    /// <summary>hidden · Wᵀ with the checkpoint's output matrix (tied: the token embeddings), read from the safetensors file.</summary>
    private static float[] Logits(float[] hidden)
    {
        using var file = SafetensorsFile.Open(Path.Combine(Fixtures.Model("tiny-qwen3-chat"), "model.safetensors"));
        string name = file.Entries.ContainsKey("lm_head.weight") ? "lm_head.weight" : "model.embed_tokens.weight";
        using var w = file.Read(name, ScalarType.Float32, CPU);
        using var h = tensor(hidden);
        using var logits = w.matmul(h);
        return logits.data<float>().ToArray();
    }

    [Fact]
    public void Last_and_mean_pooled_hidden_states_give_the_reference_logits_through_the_output_matrix()
    {
        using var llm = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        var cases = Fixtures.Reference("tiny-qwen3-chat")["cases"]!.AsArray();
        var prompts = cases.Select(c => (IReadOnlyList<int>)Fixtures.Ints(c!["prompt_ids"])).ToArray();
        var last = llm.Engine.Embed(prompts, EmbeddingPooling.Last, normalize: false);
        var mean = llm.Engine.Embed(prompts, EmbeddingPooling.Mean, normalize: false);
        var unit = llm.Engine.Embed(prompts);
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(llm.Engine.Model.Config.HiddenSize, last[i].Length);
            float diff = EngineHarness.MaxAbsDiff(Logits(last[i]), Fixtures.Floats(cases[i]!["last_logits"]));
            Assert.True(diff <= 1e-4f, $"case {i}: last-token logits differ from the reference by {diff}");

            var rows = EngineHarness.AllPositionLogits(llm.Engine, [.. prompts[i]]);
            var meanLogits = Enumerable.Range(0, rows[0].Length).Select(v => rows.Average(r => r[v])).Select(x => (float)x).ToArray();
            diff = EngineHarness.MaxAbsDiff(Logits(mean[i]), meanLogits);
            Assert.True(diff <= 1e-4f, $"case {i}: mean-pooled logits differ from the mean of the positions' logits by {diff}");

            double norm = Math.Sqrt(last[i].Sum(x => (double)x * x));
            Assert.Equal(1.0, Math.Sqrt(unit[i].Sum(x => (double)x * x)), 5);
            Assert.True(unit[i].Zip(last[i]).All(p => Math.Abs(p.First - p.Second / norm) < 1e-5));
        }
        EngineHarness.AssertNoLeaks(llm.Engine);
    }

    /// <summary>A long input runs in chunks of MaxNumBatchedTokens (as chunked prefill does): the same vectors as one pass.</summary>
    [Fact]
    public void Chunked_inputs_give_the_vectors_of_one_pass()
    {
        var prompt = (IReadOnlyList<int>)Fixtures.Ints(Fixtures.Reference("tiny-qwen3-chat")["cases"]![0]!["prompt_ids"]);
        using var whole = new Llm(EngineHarness.Options("tiny-qwen3-chat"));
        using var chunked = new Llm(EngineHarness.Options("tiny-qwen3-chat", o => o.MaxNumBatchedTokens = 7));
        Assert.True(prompt.Count > 14, "the prompt should take several chunks");
        foreach (var pooling in new[] { EmbeddingPooling.Last, EmbeddingPooling.Mean })
        {
            var a = whole.Engine.Embed([prompt], pooling, normalize: false)[0];
            var b = chunked.Engine.Embed([prompt], pooling, normalize: false)[0];
            Assert.True(EngineHarness.MaxAbsDiff(a, b) <= 1e-4f, $"{pooling}: chunked differs by {EngineHarness.MaxAbsDiff(a, b)}");
        }
        EngineHarness.AssertNoLeaks(chunked.Engine);
    }

    [Fact]
    public async Task Embeddings_between_steps_leave_running_requests_unchanged_and_bad_inputs_are_named()
    {
        using var engine = new AsyncLlmEngine(EngineHarness.Options("stories260K"));
        var prompt = Fixtures.Ints(Fixtures.Reference("stories260K")["cases"]![0]!["prompt_ids"]);
        var greedy = Fixtures.Ints(Fixtures.Reference("stories260K")["cases"]![0]!["greedy_ids"]);
        var run = Task.Run(async () =>
        {
            var ids = new List<int>();
            await foreach (var o in engine.GenerateAsync(prompt, EngineHarness.Greedy(greedy.Length) with { OutputKind = RequestOutputKind.Delta }))
                ids.AddRange(o.Outputs[0].TokenIds);
            return ids;
        });
        var embeddings = new List<float[]>();
        for (int k = 0; k < 20; k++) embeddings.AddRange(await engine.EmbedAsync([prompt]));
        Assert.Equal(greedy, await run);
        Assert.All(embeddings, e => Assert.Equal(embeddings[0], e)); // the same input, the same vector, whatever ran beside it

        Assert.Contains("is empty", (await Assert.ThrowsAsync<ArgumentException>(() => engine.EmbedAsync([Array.Empty<int>()]))).Message);
        Assert.Contains("outside the vocabulary", (await Assert.ThrowsAsync<ArgumentException>(() => engine.EmbedAsync([new[] { 1, 99999 }]))).Message);
        Assert.Contains("context length", (await Assert.ThrowsAsync<ArgumentException>(() => engine.EmbedAsync([new int[600]]))).Message);
        await engine.WhenIdleAsync();
        await engine.InvokeAsync(e => EngineHarness.AssertNoLeaks(e));
    }

    /// <summary>
    /// The offline API's Embed (texts) gives the engine's vectors of the encoded texts, and Score the cosine of each
    /// pair, computed here from those vectors: one text against many, or pairwise; uneven lists are refused.
    /// </summary>
    [Fact]
    public void Offline_embed_and_score_are_the_engines_vectors_and_their_cosines()
    {
        using var llm = new Llm(EngineHarness.Options("stories260K"));
        string[] texts = ["Lily liked her dog.", "The cat sat on the mat.", "The rocket flew to the moon."];
        var vectors = llm.Embed(texts);
        var direct = llm.Engine.Embed(texts.Select(t => (IReadOnlyList<int>)llm.Engine.EncodePrompt(t)).ToArray());
        for (int i = 0; i < texts.Length; i++) Assert.Equal(direct[i], vectors[i]);
        static double Cos(float[] a, float[] b) => a.Zip(b, (x, y) => (double)x * y).Sum() / Math.Sqrt(a.Sum(x => (double)x * x) * b.Sum(x => (double)x * x));
        var query = llm.Embed(["Where is the cat?"])[0];

        var scores = llm.Score(["Where is the cat?"], texts);
        Assert.Equal(texts.Length, scores.Length);
        for (int i = 0; i < texts.Length; i++) Assert.Equal(Cos(query, vectors[i]), scores[i], 1e-6);
        var pairwise = llm.Score([texts[0], texts[1]], [texts[2], texts[1]]);
        Assert.Equal(Cos(vectors[0], vectors[2]), pairwise[0], 1e-6);
        Assert.Equal(1.0, pairwise[1], 1e-6); // a text against itself
        Assert.Throws<ArgumentException>(() => llm.Score(texts[..2], texts));
        EngineHarness.AssertNoLeaks(llm.Engine);
    }
}
