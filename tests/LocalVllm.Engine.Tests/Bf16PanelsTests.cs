using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Engine.Models;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// bfloat16 matrices in panels (<see cref="Bf16Panels"/>): the layout round-trips, rows read from it are the rows of
/// the matrix, and the kernel equals libtorch's float64 product over the widened weights, with every row's bits the
/// same alone and in any batch.
/// </summary>
public sealed unsafe class Bf16PanelsTests
{
    private static Tensor RandomBf16(long n, long k, Generator g) => (randn([n, k], generator: g) / MathF.Sqrt(k)).to(ScalarType.BFloat16);

    [Fact]
    public void Packing_round_trips_and_rows_read_from_panels_equal_the_matrix_rows()
    {
        using var scope = NewDisposeScope();
        var g = new Generator(41);
        foreach (var (n, k) in new (long, long)[] { (32, 2), (64, 30), (96, 1026) })
        {
            var w = RandomBf16(n, k, g);
            var panels = Bf16Panels.Pack(w);
            Assert.Equal(w.shape, panels.shape);
            Assert.True(Bf16Panels.Unpack(panels).equal(w).all().item<bool>(), $"[{n}, {k}] round trip");
            // In panels, row 1's first pair sits right after row 0's (not k elements later).
            if (k > 2) Assert.False(panels.equal(w).all().item<bool>(), "panels differ from row-major");
            var ids = tensor(new long[] { 0, n - 1, 31, 5, 0 });
            Assert.True(Bf16Panels.Rows(panels, ids).equal(w.index_select(0, ids).to(ScalarType.Float32)).all().item<bool>(), $"[{n}, {k}] rows");
        }
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => Bf16Panels.Rows(Bf16Panels.Pack(RandomBf16(32, 4, g)), tensor(new long[] { 32 })));
        Assert.Contains("32 rows", e.Message);
    }

    public static TheoryData<int, int, int> Shapes => new()
    {
        // rows through each tile (8, 4, 2, 1) and their mixes, a chunk boundary (256), odd k / 2, k not a multiple of 8
        { 1, 64, 32 }, { 2, 64, 64 }, { 3, 30, 96 }, { 4, 64, 32 }, { 5, 64, 64 }, { 7, 1026, 64 }, { 8, 64, 32 },
        { 9, 64, 96 }, { 12, 30, 32 }, { 15, 64, 64 }, { 16, 256, 128 }, { 31, 64, 32 }, { 64, 1026, 64 }, { 300, 64, 96 },
    };

    [SkippableTheory]
    [MemberData(nameof(Shapes))]
    public void The_panel_kernel_equals_the_product_of_the_widened_weights(int rows, int k, int n)
    {
        Skip.IfNot(Bf16Panels.Supported, "the panel kernel needs AVX-512");
        using var scope = NewDisposeScope();
        var g = new Generator(43);
        var x = randn([rows, k], generator: g);
        var w = RandomBf16(n, k, g);
        var expected = F.linear(x.to(ScalarType.Float64), w.to(ScalarType.Float64)).to(ScalarType.Float32);
        var actual = Bf16Panels.Apply(x, Bf16Panels.Pack(w));
        float err = (expected - actual).abs().max().item<float>();
        Assert.True(err < 1e-4f, $"{rows} x {k} x {n}: max error {err}");
    }

    [SkippableFact]
    public void A_row_gets_the_same_bits_alone_and_in_any_batch()
    {
        Skip.IfNot(Bf16Panels.Supported, "the panel kernel needs AVX-512");
        using var scope = NewDisposeScope();
        var g = new Generator(47);
        var x = randn([300, 130], generator: g);
        var panels = Bf16Panels.Pack(RandomBf16(64, 130, g));
        var all = Bf16Panels.Apply(x, panels);
        // Batches of 1-13 rows take every mix of the 8-, 4-, 2- and 1-row tiles; 300 rows cross a chunk.
        for (int size = 1; size <= 13; size++)
            for (int r0 = 0; r0 + size <= 40; r0 += size)
                Assert.True(Bf16Panels.Apply(x.narrow(0, r0, size), panels).equal(all.narrow(0, r0, size)).all().item<bool>(), $"rows {r0}..{r0 + size - 1}");
    }

    [SkippableFact]
    public void A_panelled_weight_matrix_multiplies_with_its_bias_and_looks_up_rows()
    {
        Skip.IfNot(Bf16Panels.Supported, "the panel kernel needs AVX-512");
        using var scope = NewDisposeScope();
        var g = new Generator(53);
        var w = RandomBf16(96, 48, g);
        var bias = randn([96], generator: g);
        var x = randn([6, 48], generator: g);
        var values = w.clone();
        nint storage = (nint)Simd.Bf16Pointer(values);
        using var matrix = WeightMatrix.Bf16(values);
        Assert.True(matrix.IsPanelled);
        // Rearranged where it lies: a second copy of every matrix would stay resident after load (docs/benchmarks.md, Memory).
        Assert.Equal(storage, (nint)Simd.Bf16Pointer(matrix.Values));
        var expected = F.linear(x.to(ScalarType.Float64), w.to(ScalarType.Float64), bias.to(ScalarType.Float64)).to(ScalarType.Float32);
        float err = (expected - matrix.Linear(x, bias, cpuKernels: true)).abs().max().item<float>();
        Assert.True(err < 1e-4f, $"max error {err}");
        var ids = tensor(new long[] { 95, 3, 3 });
        Assert.True(matrix.Rows(ids, ScalarType.Float32).equal(w.index_select(0, ids).to(ScalarType.Float32)).all().item<bool>());
        // Shapes the panels do not take stay row-major.
        using var odd = WeightMatrix.Bf16(RandomBf16(40, 48, g));
        Assert.False(odd.IsPanelled);
    }
}
