using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Kernels.Cpu;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Tests;

/// <summary>Paged attention over scattered blocks equals dense causal attention on the same inputs.</summary>
[Trait("Category", "Kernels")]
public sealed class PagedAttentionTests
{
    // Head shapes: d = 8 takes the CPU kernel's scalar-width path; multiples of 16 its 512-bit path (four positions
    // at a time, two query heads per KV head), with GQA groups of 2, 3 (an unpaired head) and 1 (no GQA), block sizes
    // that are and are not multiples of four, and 4 x 128 KV rows (whole sequences per task).
    [Theory]
    [InlineData(1, "torch", 4, 2, 8)]
    [InlineData(4, "torch", 4, 2, 8)]
    [InlineData(16, "torch", 4, 2, 8)]
    [InlineData(1, "cpu", 4, 2, 8)]
    [InlineData(4, "cpu", 4, 2, 8)]
    [InlineData(16, "cpu", 4, 2, 8)]
    [InlineData(4, "cpu-sdpa", 4, 2, 8)]
    [InlineData(16, "cpu-sdpa", 8, 4, 128)]
    [InlineData(16, "cpu", 8, 4, 128)]
    [InlineData(6, "cpu", 8, 4, 128)]
    [InlineData(16, "cpu", 6, 2, 32)]
    [InlineData(6, "cpu", 6, 2, 32)]
    [InlineData(4, "cpu", 2, 2, 16)]
    [InlineData(5, "cpu", 2, 2, 16)]
    public void Paged_attention_equals_dense_attention(int blockSize, string backendName, int heads, int kvHeads, int d)
    {
        // "cpu": the C# kernel takes decode rows and these short prefill chunks; "cpu-sdpa": prefill chunks go to SDPA.
        IAttentionBackend backend = backendName switch
        {
            "cpu" => new CpuPagedAttention(),
            "cpu-sdpa" => new CpuPagedAttention(rowKernelMaxContext: 0),
            _ => new TorchPagedAttention(),
        };
        using var scope = NewDisposeScope();
        var gen = new TorchSharp.torch.Generator(42);
        int numBlocks = 256;
        var rng = new Random(blockSize);
        // Ragged sequences: (cached prefix length, new tokens this step).
        // Decode rows (one new token) and chunks of several new tokens (prefill, or a chunk after a cached prefix).
        (int Cached, int New)[] seqs = [(0, 13), (20, 1), (5, 7), (0, 1), (33, 9), (70, 1), (2, 1)];
        var kCache = zeros(numBlocks, blockSize, kvHeads, d);
        var vCache = zeros(numBlocks, blockSize, kvHeads, d);
        var freeBlocks = Enumerable.Range(0, numBlocks).OrderBy(_ => rng.Next()).ToList();

        var fullK = new List<Tensor>(); var fullV = new List<Tensor>(); var fullQ = new List<Tensor>();
        var slotMapping = new List<long>(); var ctxSlots = new List<long>(); var spans = new List<SequenceSpan>();
        var tables = new List<int[]>();
        int qRow = 0, ctxRow = 0;
        foreach (var (cached, n) in seqs)
        {
            int total = cached + n;
            var table = Enumerable.Range(0, (total + blockSize - 1) / blockSize).Select(_ => { var b = freeBlocks[0]; freeBlocks.RemoveAt(0); return b; }).ToArray();
            tables.Add(table);
            var k = randn([total, kvHeads, d], generator: gen); var v = randn([total, kvHeads, d], generator: gen);
            var q = randn([total, heads, d], generator: gen);
            fullK.Add(k); fullV.Add(v); fullQ.Add(q);
            long Slot(int p) => (long)table[p / blockSize] * blockSize + p % blockSize;
            // The cached prefix is already in the cache.
            for (int p = 0; p < cached; p++)
            {
                kCache.view(-1, kvHeads, d)[Slot(p)] = k[p];
                vCache.view(-1, kvHeads, d)[Slot(p)] = v[p];
            }
            for (int p = cached; p < total; p++) slotMapping.Add(Slot(p));
            for (int p = 0; p < total; p++) ctxSlots.Add(Slot(p));
            spans.Add(new SequenceSpan(qRow, n, total, ctxRow));
            qRow += n; ctxRow += total;
        }
        var qNew = cat(seqs.Select((s, i) => fullQ[i].narrow(0, s.Cached, s.New)).ToArray(), 0);
        var kNew = cat(seqs.Select((s, i) => fullK[i].narrow(0, s.Cached, s.New)).ToArray(), 0);
        var vNew = cat(seqs.Select((s, i) => fullV[i].narrow(0, s.Cached, s.New)).ToArray(), 0);
        var meta = new AttentionMetadata(tensor(slotMapping.ToArray()), tensor(ctxSlots.ToArray()), spans, tables.ToArray(), blockSize);

        var paged = backend.Forward(qNew, kNew, vNew, kCache, vCache, meta);

        // Dense reference: full causal attention over each whole sequence, explicit softmax, then the new rows.
        int row = 0;
        for (int i = 0; i < seqs.Length; i++)
        {
            var (cached, n) = seqs[i];
            int total = cached + n;
            var q = fullQ[i].transpose(0, 1); // [heads, total, d]
            var k = fullK[i].repeat_interleave(heads / kvHeads, dim: 1).transpose(0, 1);
            var v = fullV[i].repeat_interleave(heads / kvHeads, dim: 1).transpose(0, 1);
            var scores = q.matmul(k.transpose(1, 2)) / Math.Sqrt(d);
            var mask = ones(total, total).triu(1).to(ScalarType.Bool);
            var probs = F.softmax(scores.masked_fill(mask, double.NegativeInfinity), -1);
            var dense = probs.matmul(v).transpose(0, 1).reshape(total, heads * d).narrow(0, cached, n);
            var mine = paged.narrow(0, row, n);
            Assert.True((dense - mine).abs().max().item<float>() <= 1e-5f, $"sequence {i} (block size {blockSize}, {backendName}, {heads}/{kvHeads} heads of {d})");
            row += n;
        }
    }
}
