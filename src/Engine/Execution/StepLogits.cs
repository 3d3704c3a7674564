using static TorchSharp.torch;

namespace LocalVllm.Engine.Execution;

/// <summary>Logit rows of one step: which sequences sample and which rows hold prompt positions for prompt logprobs.</summary>
/// <param name="Logits">[rows, vocab] float32.</param>
/// <param name="SampleRows">Per scheduled sequence, its sampling row, or -1 when it does not sample this step.</param>
/// <param name="PromptRows">Per scheduled sequence, (first row, first position, count) of prompt-logprob rows, or null.</param>
/// <param name="DraftRows">
/// Speculative decoding: per scheduled sequence, how many rows after its sampling row belong to its draft tokens (the
/// row of draft j holds the model's choice after it), or null when no sequence of the step has drafts.
/// </param>
public sealed record StepLogits(Tensor Logits, int[] SampleRows, (int Row, int Position, int Count)?[] PromptRows, int[]? DraftRows = null);
