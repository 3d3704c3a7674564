using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Diagnostics;
using LocalVllm.Engine.Execution;
using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Engine.Loading;
using LocalVllm.Engine.Kernels;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Models;

/// <summary>
/// A decoder-only transformer of the Llama family (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3 with per-head q/k
/// norm). Weights are keyed exactly as in the checkpoint; q/k/v and gate/up are concatenated at load time so that each
/// runs as one matrix multiply over all packed tokens.
/// </summary>
public sealed class CausalLm : IDisposable
{
    private sealed class Layer : IDisposable
    {
        public required Tensor InputNorm;
        public required WeightMatrix QkvWeight; // [(heads + 2 * kvHeads) * headDim, hidden]
        public Tensor? QkvBias;
        public Tensor? QNorm, KNorm; // [headDim]
        public required WeightMatrix OWeight; // [hidden, heads * headDim]
        public required Tensor PostNorm;
        public required WeightMatrix GateUpWeight; // [2 * intermediate, hidden]
        public required WeightMatrix DownWeight; // [hidden, intermediate]

        public IEnumerable<WeightMatrix> Matrices => [QkvWeight, OWeight, GateUpWeight, DownWeight];

        public void Dispose()
        {
            foreach (var t in new[] { InputNorm, QkvBias, QNorm, KNorm, PostNorm })
                t?.Dispose();
            foreach (var m in Matrices) m.Dispose();
        }
    }

    private readonly Layer[] _layers;
    private readonly WeightMatrix _embed; // [vocab, hidden]
    private readonly Tensor _norm; // [hidden]
    private readonly WeightMatrix _lmHead; // [vocab, hidden]; the embedding itself when tied
    private readonly RotaryEmbedding _rope;
    private readonly IAttentionBackend _attention;
    private readonly bool _cpuKernels;
    private readonly bool _tiedHead; // _lmHead is a view of _embed

    private CausalLm(ModelConfig config, Layer[] layers, WeightMatrix embed, Tensor norm, WeightMatrix lmHead, RotaryEmbedding rope,
        IAttentionBackend attention, ScalarType dtype, Device device, bool cpuKernels, ScalarType matrixDtype, bool tiedHead)
    {
        MatrixDType = matrixDtype;
        _tiedHead = tiedHead;
        _cpuKernels = cpuKernels;
        Config = config;
        _layers = layers;
        _embed = embed;
        _norm = norm;
        _lmHead = lmHead;
        _rope = rope;
        _attention = attention;
        DType = dtype;
        Device = device;
    }

    /// <summary>The attention backend the forward pass uses.</summary>
    internal IAttentionBackend AttentionBackend => _attention;

    /// <summary>The model's configuration.</summary>
    public ModelConfig Config { get; }
    /// <summary>The compute dtype.</summary>
    public ScalarType DType { get; }
    /// <summary>
    /// The dtype the projections, embedding and LM head are kept in: bfloat16 with float32 compute (see
    /// <see cref="EngineOptions.WeightDType"/>), Int8 when quantized (<see cref="EngineOptions.Quantization"/>; a
    /// matrix whose rows are not whole groups of 32 then stays in the compute dtype).
    /// </summary>
    public ScalarType MatrixDType { get; }
    /// <summary>Bytes the parameters occupy (a tied LM head counted once).</summary>
    public long WeightBytes
    {
        get
        {
            static long Bytes(Tensor? t) => t is null ? 0 : t.NumberOfElements * t.ElementSize;
            long total = _embed.Bytes + Bytes(_norm) + (_tiedHead ? 0 : _lmHead.Bytes);
            foreach (var l in _layers)
                total += Bytes(l.InputNorm) + Bytes(l.QkvBias) + Bytes(l.QNorm) + Bytes(l.KNorm) + Bytes(l.PostNorm) + l.Matrices.Sum(m => m.Bytes);
            return total;
        }
    }
    /// <summary>How many of the matrices (layers', embedding, LM head) are bfloat16 in panels (<see cref="Kernels.Cpu.Bf16Panels"/>).</summary>
    internal int MatricesInPanels => _layers.Sum(l => l.Matrices.Count(m => m.IsPanelled)) + (_embed.IsPanelled ? 1 : 0) + (_lmHead.IsPanelled ? 1 : 0);
    /// <summary>The device the weights live on.</summary>
    public Device Device { get; }

    /// <summary>Every checkpoint key the architecture expects, with its shape.</summary>
    public static IReadOnlyDictionary<string, long[]> ExpectedTensors(ModelConfig c)
    {
        var t = new Dictionary<string, long[]>(StringComparer.Ordinal)
        {
            ["model.embed_tokens.weight"] = [c.VocabSize, c.HiddenSize],
            ["model.norm.weight"] = [c.HiddenSize],
            ["lm_head.weight"] = [c.VocabSize, c.HiddenSize],
        };
        long q = (long)c.NumAttentionHeads * c.HeadDim, kv = (long)c.NumKeyValueHeads * c.HeadDim;
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            var p = $"model.layers.{i}.";
            t[p + "input_layernorm.weight"] = [c.HiddenSize];
            t[p + "post_attention_layernorm.weight"] = [c.HiddenSize];
            t[p + "self_attn.q_proj.weight"] = [q, c.HiddenSize];
            t[p + "self_attn.k_proj.weight"] = [kv, c.HiddenSize];
            t[p + "self_attn.v_proj.weight"] = [kv, c.HiddenSize];
            t[p + "self_attn.o_proj.weight"] = [c.HiddenSize, q];
            if (c.AttentionBias)
            {
                t[p + "self_attn.q_proj.bias"] = [q];
                t[p + "self_attn.k_proj.bias"] = [kv];
                t[p + "self_attn.v_proj.bias"] = [kv];
            }
            if (c.QkNorm)
            {
                t[p + "self_attn.q_norm.weight"] = [c.HeadDim];
                t[p + "self_attn.k_norm.weight"] = [c.HeadDim];
            }
            t[p + "mlp.gate_proj.weight"] = [c.IntermediateSize, c.HiddenSize];
            t[p + "mlp.up_proj.weight"] = [c.IntermediateSize, c.HiddenSize];
            t[p + "mlp.down_proj.weight"] = [c.HiddenSize, c.IntermediateSize];
        }
        return t;
    }

    /// <summary>Loads the model in <paramref name="dir"/> onto <paramref name="device"/> in <paramref name="dtype"/>.</summary>
    public static CausalLm Load(ModelDirectory dir, ScalarType dtype, Device device, IAttentionBackend? attention = null) =>
        Load(dir, dtype, device, attention, cpuKernels: true);

    /// <summary>
    /// As <see cref="Load(ModelDirectory, ScalarType, Device, IAttentionBackend?)"/>; <paramref name="cpuKernels"/>: false
    /// keeps every op in libtorch. <paramref name="weightDType"/> (<see cref="EngineOptions.WeightDType"/>) and
    /// <paramref name="quantizeInt8"/> (<see cref="EngineOptions.Quantization"/>) choose how the projections, the
    /// embedding and the LM head are kept; both apply only where the C# kernels compute in float32 on the CPU (norms
    /// and biases always stay in <paramref name="dtype"/>).
    /// </summary>
    internal static CausalLm Load(ModelDirectory dir, ScalarType dtype, Device device, IAttentionBackend? attention, bool cpuKernels,
        string weightDType = "auto", bool quantizeInt8 = false)
    {
        bool ownKernels = cpuKernels && dtype == ScalarType.Float32 && device.type == TorchSharp.DeviceType.CPU;
        if (quantizeInt8 && !ownKernels)
            throw new ArgumentException($"int8 weights need float32 compute with the CPU kernels, not {dtype} on {device}.");
        var c = dir.Config;
        using var weights = new WeightLoader(dir.WeightFiles);
        var expected = ExpectedTensors(c);
        var optional = c.TieWordEmbeddings ? new HashSet<string> { "lm_head.weight" } : new HashSet<string>();
        weights.Validate(expected, optional, key => key.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal));
        // bfloat16 matrices where asked for, or ("auto") where the checkpoint stores them so.
        var matrixDtype = ownKernels && (weightDType == "bfloat16" || (weightDType == "auto" && weights.StoredDType("model.embed_tokens.weight") == "BF16"))
            ? ScalarType.BFloat16 : dtype;

        Tensor Read(string key) => weights.Read(key, dtype, device);
        Tensor ReadCat(params string[] keys) => weights.ReadStacked(keys, expected, dtype, device);
        WeightMatrix ReadMatrices(params string[] keys)
        {
            WeightMatrix Plain()
            {
                var values = weights.ReadStacked(keys, expected, matrixDtype, device);
                return ownKernels && matrixDtype == ScalarType.BFloat16 ? WeightMatrix.Bf16(values) : WeightMatrix.Plain(values);
            }
            return quantizeInt8 ? WeightMatrix.ReadQuantized(weights, keys, keys.Select(k => expected[k]).ToArray(), Plain) : Plain();
        }
        WeightMatrix ReadMatrix(string key) => ReadMatrices(key);

        var layers = new Layer[c.NumHiddenLayers];
        for (int i = 0; i < layers.Length; i++)
        {
            var p = $"model.layers.{i}.";
            layers[i] = new Layer
            {
                InputNorm = Read(p + "input_layernorm.weight"),
                QkvWeight = ReadMatrices(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                QkvBias = c.AttentionBias ? ReadCat(p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias") : null,
                QNorm = c.QkNorm ? Read(p + "self_attn.q_norm.weight") : null,
                KNorm = c.QkNorm ? Read(p + "self_attn.k_norm.weight") : null,
                OWeight = ReadMatrix(p + "self_attn.o_proj.weight"),
                PostNorm = Read(p + "post_attention_layernorm.weight"),
                GateUpWeight = ReadMatrices(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                DownWeight = ReadMatrix(p + "mlp.down_proj.weight"),
            };
        }
        foreach (var layer in layers)
            foreach (var m in layer.Matrices)
                m.AdviseHugePages();
        var embed = ReadMatrix("model.embed_tokens.weight");
        embed.AdviseHugePages();
        bool tied = !weights.Contains("lm_head.weight") || c.TieWordEmbeddings;
        var lmHead = tied ? embed.Alias() : ReadMatrix("lm_head.weight");
        lmHead.AdviseHugePages();
        return new CausalLm(c, layers, embed, Read("model.norm.weight"), lmHead, new RotaryEmbedding(c, device),
            attention ?? new TorchPagedAttention(), dtype, device, cpuKernels, quantizeInt8 ? ScalarType.Int8 : matrixDtype, tied);
    }

    /// <summary>
    /// Runs the packed tokens of one step. <paramref name="inputIds"/> and <paramref name="positions"/> are int64
    /// [tokens]; <paramref name="logitIndices"/> (int64) picks the rows whose logits are returned, [rows, vocab] float32,
    /// or, with <paramref name="hiddenStates"/>, their final hidden states (after the last norm, before the LM head),
    /// [rows, hidden] float32: what embeddings pool.
    /// </summary>
    public Tensor Forward(Tensor inputIds, Tensor positions, int maxPosition, AttentionMetadata metadata, KvCache cache, Tensor logitIndices,
        bool hiddenStates = false) => Forward(inputIds, positions, maxPosition, metadata, cache, logitIndices, hiddenStates, null);

    /// <summary>The pass with LoRA adapters: <paramref name="lora"/> adds their updates to its rows after each projection.</summary>
    internal Tensor Forward(Tensor inputIds, Tensor positions, int maxPosition, AttentionMetadata metadata, KvCache cache, Tensor logitIndices,
        bool hiddenStates, Lora.LoraBatch? lora)
    {
        using var scope = NewDisposeScope();
        var c = Config;
        int tokens = (int)inputIds.shape[0];
        long qSize = (long)c.NumAttentionHeads * c.HeadDim, kvSize = (long)c.NumKeyValueHeads * c.HeadDim;
        ForwardProfile.BeginPass(tokens);
        long t = ForwardProfile.Now();
        var (cosRows, sinRows) = _rope.CosSin(positions, maxPosition); // float32 [tokens, headDim]

        var residual = _embed.Rows(inputIds, DType); // [tokens, hidden]
        Tensor? pending = null; // the previous layer's MLP output, added to the residual by the next norm
        bool fused = _cpuKernels && CpuLayerOps.Supports(residual);
        // The libtorch path broadcasts cos/sin over heads in the model's dtype, once per step.
        var (cos, sin) = fused ? (cosRows, sinRows) : RotaryEmbedding.ForHeads(cosRows, sinRows, DType);
        for (int l = 0; l < _layers.Length; l++)
        {
            var layer = _layers[l];
            using var layerScope = NewDisposeScope();
            Tensor h;
            if (pending is null)
                h = fused ? CpuLayerOps.RmsNorm(residual, layer.InputNorm, c.RmsNormEps) : RmsNorm(residual, layer.InputNorm, c.RmsNormEps);
            else
            {
                var (sum, normed0) = fused
                    ? CpuLayerOps.AddRmsNorm(residual, pending, layer.InputNorm, c.RmsNormEps)
                    : (HeldScalars.Add(residual, pending), null);
                residual.Dispose();
                pending.Dispose();
                residual = sum;
                h = normed0 ?? RmsNorm(residual, layer.InputNorm, c.RmsNormEps);
            }
            t = ForwardProfile.Add(ForwardProfile.Part.Other, t);
            var qkv = Linear(h, layer.QkvWeight, layer.QkvBias); // [tokens, q + 2 * kv]
            lora?.Apply(l, Lora.LoraAdapter.Projection.Qkv, h, qkv);
            t = ForwardProfile.Add(ForwardProfile.Part.Linear, t);
            Tensor q, k, v;
            if (fused)
                (q, k, v) = CpuLayerOps.SplitNormRope(qkv, c.NumAttentionHeads, c.NumKeyValueHeads, c.HeadDim,
                    layer.QNorm, layer.KNorm, c.RmsNormEps, cosRows, sinRows);
            else
            {
                q = qkv.narrow(1, 0, qSize).view(tokens, c.NumAttentionHeads, c.HeadDim);
                k = qkv.narrow(1, qSize, kvSize).view(tokens, c.NumKeyValueHeads, c.HeadDim);
                v = qkv.narrow(1, qSize + kvSize, kvSize).reshape(tokens, c.NumKeyValueHeads, c.HeadDim);
                if (layer.QNorm is not null) q = RmsNorm(q, layer.QNorm, c.RmsNormEps);
                if (layer.KNorm is not null) k = RmsNorm(k, layer.KNorm, c.RmsNormEps);
                q = RotaryEmbedding.Apply(q, cos, sin);
                k = RotaryEmbedding.Apply(k, cos, sin);
            }
            t = ForwardProfile.Add(ForwardProfile.Part.Other, t);
            var attn = _attention.Forward(q, k, v, cache.Keys(l), cache.Values(l), metadata); // [tokens, heads * headDim]
            t = ForwardProfile.Add(ForwardProfile.Part.Attention, t);
            var o = Linear(attn, layer.OWeight, null);
            lora?.Apply(l, Lora.LoraAdapter.Projection.O, attn, o);
            t = ForwardProfile.Add(ForwardProfile.Part.Linear, t);
            var (hidden, h2) = fused
                ? CpuLayerOps.AddRmsNorm(residual, o, layer.PostNorm, c.RmsNormEps)
                : (HeldScalars.Add(residual, o), null);
            h2 ??= RmsNorm(hidden, layer.PostNorm, c.RmsNormEps);
            t = ForwardProfile.Add(ForwardProfile.Part.Other, t);
            var gateUp = Linear(h2, layer.GateUpWeight, null); // [tokens, 2 * intermediate]
            lora?.Apply(l, Lora.LoraAdapter.Projection.GateUp, h2, gateUp);
            t = ForwardProfile.Add(ForwardProfile.Part.Linear, t);
            var act = fused
                ? CpuLayerOps.SiluMul(gateUp, c.IntermediateSize)
                : F.silu(gateUp.narrow(1, 0, c.IntermediateSize)) * gateUp.narrow(1, c.IntermediateSize, c.IntermediateSize);
            t = ForwardProfile.Add(ForwardProfile.Part.Other, t);
            var down = Linear(act, layer.DownWeight, null);
            lora?.Apply(l, Lora.LoraAdapter.Projection.Down, act, down);
            t = ForwardProfile.Add(ForwardProfile.Part.Linear, t);
            residual.Dispose();
            residual = hidden.MoveToOuterDisposeScope();
            pending = down.MoveToOuterDisposeScope();
        }
        var x = pending is null ? residual : HeldScalars.Add(residual, pending);
        var selected = x.index_select(0, logitIndices);
        var normed = RmsNorm(selected, _norm, c.RmsNormEps);
        t = ForwardProfile.Add(ForwardProfile.Part.Other, t);
        if (hiddenStates) return normed.to(ScalarType.Float32).MoveToOuterDisposeScope();
        // The LM head keeps float32 inputs with int8 weights: its error lands on the logits directly (quantized inputs
        // there took int8's mean KL from float32 from below llama.cpp Q8_0's to just above it; docs/benchmarks.md).
        var logits = _lmHead.Linear(normed, null, _cpuKernels, quantizeInputs: false).to(ScalarType.Float32); // [rows, vocab]
        ForwardProfile.Add(ForwardProfile.Part.LmHead, t);
        return logits.MoveToOuterDisposeScope();
    }

    private Tensor Linear(Tensor x, WeightMatrix weight, Tensor? bias) => weight.Linear(x, bias, _cpuKernels);

    /// <summary>RMSNorm as transformers computes it: normalise in float32, cast back, then scale.</summary>
    internal static Tensor RmsNorm(Tensor x, Tensor weight, double eps)
    {
        using var scope = NewDisposeScope();
        var xf = x.dtype == ScalarType.Float32 ? x : x.to(ScalarType.Float32);
        // Scalars held until the calls return (a temporary one can be finalized while libtorch reads it).
        using var two = TorchSharp.ScalarExtensionMethods.ToScalar(2);
        using var epsilon = TorchSharp.ScalarExtensionMethods.ToScalar(eps);
        var variance = xf.pow(two).mean([-1], keepdim: true);
        var normed = xf * HeldScalars.Add(variance, epsilon).rsqrt();
        return (weight * (x.dtype == ScalarType.Float32 ? normed : normed.to(x.dtype))).MoveToOuterDisposeScope();
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var l in _layers) l.Dispose();
        _embed.Dispose();
        _norm.Dispose();
        _lmHead.Dispose();
        _rope.Dispose();
    }
}
