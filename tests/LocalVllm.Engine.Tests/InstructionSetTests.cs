using System.Diagnostics;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using System.Xml.Linq;
using LocalVllm.Engine.Kernels.Cpu;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// Which code the kernels run follows what the runtime reports of the CPU. Run plainly, this checks the dispatch on
/// this host; run by <see cref="InstructionSetFallbackTests"/> in a child process with a feature level switched off
/// (<c>LOCALVLLM_EXPECT_ISA</c> names it), it proves the fallback was the path taken.
/// </summary>
[Trait("Category", "Kernels")]
public sealed class InstructionSetProbeTests
{
    [Fact]
    public void The_kernels_dispatch_on_the_instruction_sets_the_runtime_reports()
    {
        using var scope = NewDisposeScope();
        var x = randn([4, 64]);
        var w = randn([8, 64]);
        switch (Environment.GetEnvironmentVariable("LOCALVLLM_EXPECT_ISA"))
        {
            case "avx2": // an AVX2 host: 256-bit vectors with FMA, no AVX-512
                Assert.False(Vector512.IsHardwareAccelerated);
                Assert.True(Vector256.IsHardwareAccelerated);
                Assert.True(Fma.IsSupported);
                Assert.False(SmallBatchLinear.BroadcastSupported);
                Assert.Throws<PlatformNotSupportedException>(() => SmallBatchLinear.Apply(x, w, null, SmallBatchLinear.Kernel.Broadcast));
                break;
            case "sse": // no AVX2/FMA: Simd.Fma's unfused branch, software 256-bit vectors
                Assert.False(Vector256.IsHardwareAccelerated);
                Assert.False(Fma.IsSupported);
                Assert.False(SmallBatchLinear.BroadcastSupported);
                break;
            case null:
                Assert.Equal(Vector512.IsHardwareAccelerated && Avx512F.IsSupported, SmallBatchLinear.BroadcastSupported);
                break;
            case var other:
                Assert.Fail($"LOCALVLLM_EXPECT_ISA={other} is not a level this probe knows (avx2, sse).");
                break;
        }
    }
}

/// <summary>
/// The kernel and fixture tests again, in a child <c>dotnet test</c> whose runtime has a feature level switched off:
/// AVX-512 (an AVX2 host, as many hosts of this machine kind are) and AVX2 with FMA (the unfused fallback). .NET 10
/// groups its knobs by level: <c>DOTNET_EnableAVX512=0</c> and <c>DOTNET_EnableAVX2=0</c> work, while the older
/// <c>DOTNET_EnableAVX512F=0</c> and <c>DOTNET_EnableFMA=0</c> no longer change anything.
/// </summary>
[Trait("Category", "IsaChild")]
public sealed class InstructionSetFallbackTests(ITestOutputHelper output)
{
    [SkippableTheory]
    [InlineData("avx2", "DOTNET_EnableAVX512", "Category=Kernels|Category=Fixtures", 100)]
    [InlineData("sse", "DOTNET_EnableAVX2", "Category=Kernels|Category=Fixtures", 100)]
    public void Kernel_and_fixture_tests_pass_with_a_feature_level_switched_off(string level, string knob, string filter, int minPassed)
    {
        Skip.If(level == "avx2" && !Vector512.IsHardwareAccelerated, "this host has no AVX-512: the main run already is the AVX2 run");
        Skip.If(level == "sse" && !Vector256.IsHardwareAccelerated, "this host has no AVX2: the main run already is the fallback run");
        Skip.If(Environment.GetEnvironmentVariable("LOCALVLLM_EXPECT_ISA") is not null, "already inside a child run");

        string dll = typeof(InstructionSetFallbackTests).Assembly.Location;
        string results = Directory.CreateTempSubdirectory("localvllm-isa-").FullName;
        try
        {
            var start = new ProcessStartInfo("dotnet")
            {
                ArgumentList = { "test", dll, "--filter", filter, "--logger", "trx;LogFileName=child.trx", "--results-directory", results },
                RedirectStandardOutput = true,
                RedirectStandardError = true,
            };
            start.Environment[knob] = "0";
            start.Environment["LOCALVLLM_EXPECT_ISA"] = level;
            using var child = Process.Start(start)!;
            var stdout = child.StandardOutput.ReadToEndAsync();
            var stderr = child.StandardError.ReadToEndAsync();
            if (!child.WaitForExit(TimeSpan.FromMinutes(8)))
            {
                child.Kill(entireProcessTree: true);
                Assert.Fail($"The {level} child run did not finish within 8 minutes.");
            }
            output.WriteLine(stdout.Result);
            output.WriteLine(stderr.Result);

            var trx = XDocument.Load(Path.Combine(results, "child.trx"));
            var outcomes = trx.Descendants().Where(e => e.Name.LocalName == "UnitTestResult")
                .Select(e => (Name: (string)e.Attribute("testName")!, Outcome: (string)e.Attribute("outcome")!)).ToList();
            var failed = outcomes.Where(o => o.Outcome == "Failed").Select(o => o.Name).ToList();
            Assert.True(failed.Count == 0, $"{failed.Count} tests failed with {knob}=0: {string.Join(", ", failed)}");
            Assert.Equal(0, child.ExitCode);
            Assert.InRange(outcomes.Count(o => o.Outcome == "Passed"), minPassed, int.MaxValue);
            // The probe passing under LOCALVLLM_EXPECT_ISA is what says the fallback was the path taken.
            Assert.Contains(outcomes, o => o.Name.EndsWith(nameof(InstructionSetProbeTests.The_kernels_dispatch_on_the_instruction_sets_the_runtime_reports), StringComparison.Ordinal) && o.Outcome == "Passed");
        }
        finally
        {
            Directory.Delete(results, recursive: true);
        }
    }
}
