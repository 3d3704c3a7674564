using System.Buffers.Binary;
using System.Text;
using LocalVllm.Engine.Loading;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// A model file comes from the internet: no header, however crafted, may make the loader read outside the file.
/// Mutations of a real fixture file (stories260K) must each end in a clean <see cref="InvalidDataException"/> that
/// names the file, or load tensors that lie inside the data section.
/// </summary>
public sealed class SafetensorsFuzzTests
{
    private static readonly byte[] Original = File.ReadAllBytes(Path.Combine(Fixtures.Model("stories260K"), "model.safetensors"));
    private static int HeaderLength => (int)BinaryPrimitives.ReadInt64LittleEndian(Original);
    private static string HeaderText => Encoding.UTF8.GetString(Original, 8, HeaderLength);

    [Fact]
    public void Negative_data_offsets_are_refused_before_any_read()
    {
        // The case that used to kill the process: begin and end both shifted below zero keep end - begin == size.
        var header = HeaderText.Replace("\"data_offsets\":[0,131072]", "\"data_offsets\":[-4000000000,-3999868928]");
        Assert.NotEqual(HeaderText, header);
        var path = WriteWithHeader(header);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(path));
        Assert.Contains(path, e.Message);
        Assert.Contains("model.embed_tokens.weight", e.Message);
        Assert.Contains("data_offsets", e.Message);
    }

    [Theory]
    [InlineData("\"data_offsets\":[0,131072]", "\"data_offsets\":[4,131076]", "overlaps")]
    [InlineData("\"data_offsets\":[0,131072]", "\"data_offsets\":[131072,0]", "invalid data_offsets")]
    [InlineData("\"shape\":[512,64]", "\"shape\":[512,-64]", "shape")]
    [InlineData("\"shape\":[512,64]", "\"shape\":[4611686018427387904,4]", "overflows")]
    [InlineData("\"dtype\":\"F32\",\"shape\":[512,64]", "\"dtype\":\"Q9\",\"shape\":[512,64]", "unknown dtype")]
    [InlineData("\"data_offsets\":[0,131072]", "\"data_offsets\":[0]", "data_offsets")]
    [InlineData("\"data_offsets\":[0,131072]", "\"data_offsets\":[0,1.5e300]", "data_offsets")]
    public void A_crafted_entry_is_an_error_naming_the_file_the_tensor_and_the_check(string find, string replace, string expected)
    {
        var header = HeaderText.Replace(find, replace);
        Assert.NotEqual(HeaderText, header);
        var path = WriteWithHeader(header);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(path));
        Assert.Contains(path, e.Message);
        Assert.Contains("model.embed_tokens.weight", e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void Thousands_of_mutated_headers_end_cleanly_and_never_read_outside_the_data()
    {
        var rng = new Random(1234);
        var header = Original.AsSpan(8, HeaderLength).ToArray();
        long dataLength = Original.Length - 8 - HeaderLength;
        byte[] interesting = "-0123456789[],:\"{}eE.".Select(c => (byte)c).ToArray();
        int accepted = 0, refused = 0;
        for (int i = 0; i < 5000; i++)
        {
            var mutant = (byte[])header.Clone();
            int edits = 1 + rng.Next(4);
            for (int k = 0; k < edits; k++)
            {
                int at = rng.Next(mutant.Length);
                mutant[at] = rng.Next(3) == 0 ? (byte)rng.Next(256) : interesting[rng.Next(interesting.Length)];
            }
            try
            {
                var entries = SafetensorsFile.ParseHeader(mutant, dataLength, "mutant.safetensors");
                foreach (var e in entries.Values) Assert.True(e.Begin >= 0 && e.Begin <= e.End && e.End <= dataLength, $"mutant {i}: {e}");
                accepted++;
            }
            catch (InvalidDataException e)
            {
                Assert.Contains("mutant.safetensors", e.Message);
                refused++;
            }
        }
        Assert.True(refused > 1000 && accepted > 0, $"{refused} refused, {accepted} accepted: the mutations should exercise both sides");
    }

    [Fact]
    public void Mutated_and_truncated_files_open_and_read_cleanly_or_are_refused()
    {
        var rng = new Random(99);
        var dir = Directory.CreateTempSubdirectory("localvllm-fuzz-").FullName;
        try
        {
            for (int i = 0; i < 300; i++)
            {
                var bytes = (byte[])Original.Clone();
                if (i % 3 == 0) bytes = bytes[..rng.Next(bytes.Length)]; // truncated anywhere, header included
                else if (i % 3 == 1) BinaryPrimitives.WriteInt64LittleEndian(bytes, rng.Next(4) switch
                {
                    0 => -rng.NextInt64(1, long.MaxValue), 1 => rng.NextInt64(), 2 => HeaderLength + rng.Next(-16, 16), _ => 0,
                });
                else
                    for (int k = 0; k < 3; k++) bytes[8 + rng.Next(HeaderLength)] = (byte)"-0123456789"[rng.Next(11)];
                var path = Path.Combine(dir, $"m{i}.safetensors");
                File.WriteAllBytes(path, bytes);
                SafetensorsFile file;
                try
                {
                    file = SafetensorsFile.Open(path);
                }
                catch (InvalidDataException e)
                {
                    Assert.Contains(path, e.Message);
                    continue;
                }
                using (file)
                    foreach (var name in file.Entries.Keys)
                    {
                        using var scope = NewDisposeScope();
                        try
                        {
                            file.Read(name, ScalarType.Float32, CPU);
                        }
                        catch (NotSupportedException e)
                        {
                            // A valid but non-float dtype (I64 after a mutation, say): refused when read, naming both.
                            Assert.Contains(name, e.Message);
                        }
                    }
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static string WriteWithHeader(string header)
    {
        var json = Encoding.UTF8.GetBytes(header);
        var data = Original.AsSpan(8 + HeaderLength);
        var bytes = new byte[8 + json.Length + data.Length];
        BinaryPrimitives.WriteInt64LittleEndian(bytes, json.Length);
        json.CopyTo(bytes, 8);
        data.CopyTo(bytes.AsSpan(8 + json.Length));
        var path = Path.Combine(Directory.CreateTempSubdirectory("localvllm-st-").FullName, "model.safetensors");
        File.WriteAllBytes(path, bytes);
        return path;
    }

    [Fact]
    public void A_tensor_of_more_than_2_GiB_is_read_whole()
    {
        // A sparse file: a 2.25 GiB F32 tensor of zeros with a few bytes written at known places, past the 2 GiB mark too.
        long elements = (9L << 30) / 4 / 4; // 2.25 GiB of floats
        long bytes = elements * 4;
        var header = Encoding.UTF8.GetBytes($"{{\"big\":{{\"dtype\":\"F32\",\"shape\":[{elements}],\"data_offsets\":[0,{bytes}]}}}}");
        var path = Path.Combine(Directory.CreateTempSubdirectory("localvllm-big-").FullName, "big.safetensors");
        long[] marks = [0, (1L << 30) / 4 - 1, (1L << 30) / 4, (2L << 30) / 4 + 12345, elements - 1];
        try
        {
            using (var f = new FileStream(path, FileMode.Create))
            {
                Span<byte> len = stackalloc byte[8];
                BinaryPrimitives.WriteInt64LittleEndian(len, header.Length);
                f.Write(len);
                f.Write(header);
                f.SetLength(8 + header.Length + bytes);
                foreach (var m in marks)
                {
                    f.Position = 8 + header.Length + m * 4;
                    f.Write(BitConverter.GetBytes((float)(m % 1000 + 1)));
                }
            }
            using var file = SafetensorsFile.Open(path);
            using var t = file.Read("big", ScalarType.Float32, CPU);
            Assert.Equal(elements, t.numel());
            foreach (var m in marks) Assert.Equal(m % 1000 + 1, t[m].item<float>());
            Assert.Equal(0f, t[(1L << 30) / 4 + 1].item<float>());
        }
        finally
        {
            File.Delete(path);
        }
    }
}
