using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels;

/// <summary>
/// Adds tensors with an <c>alpha</c> that lives as long as the process. TorchSharp passes a
/// <see cref="Scalar"/> to libtorch by its raw handle, and its one-operand <c>add</c> overloads (the <c>+</c>
/// operator among them) create a temporary alpha of 1 that the GC may finalize while libtorch
/// still reads it: libtorch then reports a corrupt scalar ("Expected false to be true ... toFloat") and the step
/// fails (docs/reliability.md). Code that runs every step adds through these (TorchSharp's <c>sub</c> of two
/// tensors passes no alpha).
/// </summary>
internal static class HeldScalars
{
    /// <summary>The alpha of a plain sum or difference.</summary>
    public static readonly Scalar One = 1.ToScalar();

    /// <summary><paramref name="a"/> + <paramref name="b"/>.</summary>
    public static Tensor Add(Tensor a, Tensor b) => a.add(b, One);

    /// <summary><paramref name="a"/> + <paramref name="b"/> (<paramref name="b"/> must be held by the caller until this returns).</summary>
    public static Tensor Add(Tensor a, Scalar b) => a.add(b, One);

    /// <summary><paramref name="a"/> += <paramref name="b"/>.</summary>
    public static Tensor AddInPlace(Tensor a, Tensor b) => a.add_(b, One);
}
