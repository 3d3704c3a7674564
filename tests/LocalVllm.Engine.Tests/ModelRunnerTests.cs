using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>The model runner builds only the attention metadata the chosen backend reads; results do not change.</summary>
[Trait("Category", "Fixtures")]
public sealed class ModelRunnerTests
{
    /// <summary>Passes every call through and records what metadata each layer call received.</summary>
    private sealed class RecordingBackend(IAttentionBackend inner) : IAttentionBackend
    {
        public List<(bool HasContextSlots, long ContextSlotCount, SequenceSpan[] Spans)> Calls { get; } = [];

        public Tensor Forward(Tensor q, Tensor k, Tensor v, Tensor kCache, Tensor vCache, AttentionMetadata metadata)
        {
            Calls.Add((metadata.ContextSlots is not null, metadata.ContextSlots?.shape[0] ?? 0, [.. metadata.Sequences]));
            return inner.Forward(q, k, v, kCache, vCache, metadata);
        }

        public bool ReadsContextSlots(int queryLength, int contextLength) => inner.ReadsContextSlots(queryLength, contextLength);
    }

    [Fact]
    public void Context_slots_are_built_only_for_the_sequences_the_backend_reads_them_for()
    {
        int[] shortPrompt = [1, 5, 9, 13, 17, 21, 25, 29], longPrompt = [.. Enumerable.Range(0, 40).Select(i => 3 + i * 7 % 500)];
        var greedy = EngineHarness.Greedy(6);

        // Reference: the libtorch backend, which gathers every sequence's context by slot.
        var torchBackend = new RecordingBackend(new TorchPagedAttention());
        IReadOnlyList<RequestOutput> expected;
        using (var llm = new Llm(EngineHarness.Options("stories260K", o => o.AttentionBackend = torchBackend)))
            expected = llm.Generate([shortPrompt, longPrompt], greedy);
        Assert.All(torchBackend.Calls, c => Assert.True(c.HasContextSlots && c.Spans.All(s => s.ContextStart >= 0)));

        // The C# kernel reads block tables in place; only prefill chunks over its row-kernel limit (here 16) go to SDPA.
        var cpuBackend = new RecordingBackend(new CpuPagedAttention(rowKernelMaxContext: 16));
        using (var llm = new Llm(EngineHarness.Options("stories260K", o => o.AttentionBackend = cpuBackend)))
        {
            var actual = llm.Generate([shortPrompt, longPrompt], greedy);
            for (int i = 0; i < 2; i++) Assert.Equal(expected[i].Outputs[0].TokenIds, actual[i].Outputs[0].TokenIds);
        }
        foreach (var (hasSlots, count, spans) in cpuBackend.Calls)
        {
            long needed = spans.Where(s => s.QueryLength > 1 && s.ContextLength > 16).Sum(s => (long)s.ContextLength);
            Assert.Equal(needed, count);
            Assert.Equal(needed > 0, hasSlots);
            Assert.All(spans, s => Assert.Equal(s.QueryLength > 1 && s.ContextLength > 16, s.ContextStart >= 0));
        }
        Assert.Contains(cpuBackend.Calls, c => c.HasContextSlots); // the 40-token prefill
        Assert.Contains(cpuBackend.Calls, c => !c.HasContextSlots && c.Spans.All(s => s.QueryLength == 1)); // decode steps
    }

    [Fact]
    public void A_backend_that_reads_context_slots_only_on_a_fallback_path_derives_them_from_the_block_tables()
    {
        // ContextSlotsOf computes a sequence's slots from its block table when they were not built.
        int[][] tables = [[3, 1], [0]];
        var spans = new SequenceSpan[] { new(0, 1, 6, -1), new(1, 2, 3, 0) };
        using var slotMapping = tensor(new long[] { 1 * 4 + 1, 0 * 4 + 1, 0 * 4 + 2 });
        using var built = tensor(new long[] { 0, 1, 2 });
        var metadata = new AttentionMetadata(slotMapping, built, spans, tables, blockSize: 4);
        Assert.False(metadata.HasAllContextSlots);
        Assert.Equal([12L, 13, 14, 15, 4, 5], metadata.ContextSlotsOf(0).data<long>().ToArray());
        Assert.Equal([0L, 1, 2], metadata.ContextSlotsOf(1).data<long>().ToArray());
    }
}
